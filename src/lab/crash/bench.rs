//! `pmemvm bench crash`: rounds of crash VMs, each in a child process,
//! ended by SIGKILL or by a power cut, and the check of what survived.

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::super::backing::{BackingKind, ScratchDir};
use super::super::bench::{write_json, ProbeCase};
use super::super::paging::PAGE;
use super::super::powercut::PowerCutFs;
use super::super::ProbeError;
use super::vm::{read_flush_log, AckFile};
use super::{check, CrashLayout, RoundCheck};

/// How a round ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashEnd {
    /// SIGKILL of the pmemvm process: the host page cache survives.
    Kill,
    /// The file system under the backing drops everything no completed
    /// fsync covered, then the process is killed.
    Cut,
}

impl CrashEnd {
    pub const BOTH: [CrashEnd; 2] = [Self::Kill, Self::Cut];

    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Cut => "cut",
        }
    }
}

/// `pmemvm bench crash` options.
#[derive(Debug, Clone)]
pub struct CrashBenchConfig {
    pub cases: Vec<ProbeCase>,
    pub ends: Vec<CrashEnd>,
    pub vcpus: u8,
    pub rounds: u32,
    /// The first round's index: with `seed`, it replays a round.
    pub first_round: u32,
    pub seed: u64,
    /// Rounds end at a moment drawn from 0..max_delay after the VM's first
    /// acknowledgement.
    pub max_delay: Duration,
    pub region_pages: u64,
    pub flush_mask: u64,
    pub dir: Option<PathBuf>,
    pub progress: bool,
    /// The power-cut file system acknowledges fsync without making
    /// anything durable: the check must then report losses.
    pub lying_fsync: bool,
}

impl Default for CrashBenchConfig {
    fn default() -> Self {
        Self {
            cases: ProbeCase::ENGINES.to_vec(),
            ends: CrashEnd::BOTH.to_vec(),
            vcpus: 2,
            rounds: 20,
            first_round: 0,
            seed: 1,
            max_delay: Duration::from_millis(40),
            region_pages: 4096,
            flush_mask: 15,
            dir: None,
            progress: true,
            lying_fsync: false,
        }
    }
}

/// One round, as the JSON keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub seed: u64,
    /// From the first acknowledgement to the end.
    pub delay_us: u64,
    /// From starting the child to having checked the backing.
    pub round_us: u64,
    #[serde(flatten)]
    pub check: RoundCheck,
    /// Power cut: the completed syncs and the pages they made durable.
    pub syncs: u64,
    pub pages_synced: u64,
    /// vCPUs that filled their area before the end.
    pub full_vcpus: u64,
    /// Flushes the engine completed, from its log.
    pub flushes: u64,
}

/// Pages that a sync made durable but the engine's flush did not list: a
/// page the dirty set dropped and fdatasync happened to cover (it writes
/// the whole file's dirty page cache). Each flush ends in one sync, so
/// sync `k` pairs with flush `k`; it may also carry pages written after
/// flush `k` took its dirty set, which flush `k + 1` lists. So sync `k` is
/// checked against flushes `k` and `k + 1`, for every `k` whose flush
/// `k + 1` was logged before the end. Logs that do not pair up (a sync
/// more than one past the flushes) are checked against all the flushes.
fn unlisted_pages(syncs: &[super::super::powercut::SyncRecord], flushes: &[Vec<u64>]) -> u64 {
    use std::collections::BTreeSet;
    let checked = syncs.len().min(flushes.len().saturating_sub(1));
    if syncs.len() == flushes.len() || syncs.len() == flushes.len() + 1 {
        return (0..checked)
            .map(|k| {
                let listed: BTreeSet<u64> =
                    flushes[k].iter().chain(&flushes[k + 1]).copied().collect();
                syncs[k]
                    .pages
                    .iter()
                    .filter(|p| !listed.contains(p))
                    .count() as u64
            })
            .sum();
    }
    let listed: BTreeSet<u64> = flushes.iter().flatten().copied().collect();
    let synced: BTreeSet<u64> = syncs[..checked]
        .iter()
        .flat_map(|s| s.pages.iter().copied())
        .collect();
    synced.difference(&listed).count() as u64
}

/// All rounds of one engine and one way of ending.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrashSeries {
    pub engine: String,
    pub end: CrashEnd,
    pub rounds: Vec<RoundRecord>,
    /// Rounds whose VM made no progress and were run again.
    #[serde(default)]
    pub stalled: u64,
}

impl CrashSeries {
    pub fn sum(&self, f: impl Fn(&RoundRecord) -> u64) -> u64 {
        self.rounds.iter().map(f).sum()
    }

    pub fn lost(&self) -> u64 {
        self.sum(|r| r.check.lost)
    }

    fn median_round_ms(&self) -> f64 {
        let mut t: Vec<u64> = self.rounds.iter().map(|r| r.round_us).collect();
        t.sort_unstable();
        t.get(t.len() / 2).map_or(0.0, |&us| us as f64 / 1000.0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CrashReport {
    pub bench: String,
    pub vcpus: u8,
    pub seed: u64,
    pub region_pages: u64,
    pub max_delay_us: u64,
    pub flush_mask: u64,
    pub series: Vec<CrashSeries>,
    /// Replay commands of the rounds that lost acknowledged records.
    pub failures: Vec<String>,
    pub elapsed_s: f64,
}

impl CrashReport {
    pub fn write_json(&self, path: &Path) -> Result<(), ProbeError> {
        write_json(path, self)
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "crash rounds: {} vCPU(s), {} MiB region, ended 0-{} ms after the first ack, seed {}, {:.0} s\n",
            self.vcpus,
            (self.region_pages * PAGE) >> 20,
            self.max_delay_us / 1000,
            self.seed,
            self.elapsed_s
        );
        out.push_str(&format!(
            "{:<10} {:<5} {:>7} {:>10} {:>10} {:>6} {:>10} {:>6} {:>9} {:>10}\n",
            "engine",
            "end",
            "rounds",
            "acked",
            "intact",
            "lost",
            "unacked",
            "torn",
            "syncs",
            "median ms"
        ));
        for s in &self.series {
            out.push_str(&format!(
                "{:<10} {:<5} {:>7} {:>10} {:>10} {:>6} {:>10} {:>6} {:>9} {:>10.1}\n",
                s.engine,
                s.end.name(),
                s.rounds.len(),
                s.sum(|r| r.check.acked),
                s.sum(|r| r.check.intact),
                s.lost(),
                s.sum(|r| r.check.unacked_found),
                s.sum(|r| r.check.torn),
                s.sum(|r| r.syncs),
                s.median_round_ms()
            ));
        }
        out.push_str(
            "acked: records acknowledged; intact: records found whole; lost: acknowledged but missing or damaged, and (power cut)\n\
             pages a sync made durable that no flush of the engine listed, a dropped page fdatasync covered (must be 0);\n\
             unacked: found past the acknowledgement; torn: being written at the end; syncs: completed fsyncs (power cut)\n",
        );
        for s in self.series.iter().filter(|s| s.stalled > 0) {
            out.push_str(&format!(
                "STALLED: {} {}: {} round(s) made no progress and ran again\n",
                s.engine,
                s.end.name(),
                s.stalled
            ));
        }
        for f in &self.failures {
            out.push_str(&format!("LOST: {f}\n"));
        }
        out
    }

    pub fn failure(&self) -> Option<String> {
        let lost: u64 = self.series.iter().map(CrashSeries::lost).sum();
        (lost > 0).then(|| {
            format!(
                "{lost} acknowledged records lost in {} round(s); replay with: {}",
                self.failures.len(),
                self.failures.join(" ; ")
            )
        })
    }
}

/// SplitMix64: the per-round seed and delay from the bench seed.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn round_seed(seed: u64, case: ProbeCase, end: CrashEnd, round: u32) -> u64 {
    let name = case.name().bytes().fold(0u64, |h, b| mix(h ^ u64::from(b)));
    mix(seed ^ mix(name ^ mix(end as u64 ^ mix(u64::from(round)))))
}

/// Where the rounds' files live: a scratch directory for SIGKILL rounds,
/// and a power-cut file system mounted in it for the cuts.
struct Workspace {
    /// Declared first so that it is unmounted before the directory goes.
    cut_fs: Option<PowerCutFs>,
    scratch: ScratchDir,
}

pub fn run_crash(config: &CrashBenchConfig) -> Result<CrashReport, ProbeError> {
    let started = Instant::now();
    if config.vcpus == 0 || config.vcpus > super::MAX_VCPUS {
        return Err(ProbeError::Config(format!(
            "--vcpus {}: a crash VM runs 1 to {}",
            config.vcpus,
            super::MAX_VCPUS
        )));
    }
    let scratch = ScratchDir::new(BackingKind::Sparse, config.dir.as_deref())?;
    let cut_fs = if config.ends.contains(&CrashEnd::Cut) {
        Some(
            PowerCutFs::mount(&scratch.join("cut"))
                .map_err(|e| ProbeError::Config(format!("the power-cut file system: {e}")))?,
        )
    } else {
        None
    };
    if config.lying_fsync {
        match &cut_fs {
            Some(fs) => fs.lie_about_fsync(),
            None => {
                return Err(ProbeError::Config(
                    "--lying-fsync needs power cuts (--end cut or both)".into(),
                ))
            }
        }
    }
    let ws = Workspace { cut_fs, scratch };
    let layout = CrashLayout {
        vcpus: config.vcpus,
        region_pages: config.region_pages.div_ceil(512) * 512,
    };
    let mut series = Vec::new();
    let mut failures = Vec::new();
    for &case in &config.cases {
        for &end in &config.ends {
            let mut s = CrashSeries {
                engine: case.name().to_string(),
                end,
                rounds: Vec::new(),
                stalled: 0,
            };
            let progress = Progress::new(config.progress, &s, config.rounds);
            for i in 0..config.rounds {
                let round = config.first_round + i;
                let r = match run_round(&ws, config, layout, case, end, round)? {
                    RoundEnd::Checked(r) => r,
                    // A VM that made no progress lost nothing; it is counted,
                    // shown, and its round run once more. Twice is a failure.
                    RoundEnd::Stalled(why) => {
                        eprintln!("the VM stalled, running the round again: {why}");
                        s.stalled += 1;
                        match run_round(&ws, config, layout, case, end, round)? {
                            RoundEnd::Checked(r) => r,
                            RoundEnd::Stalled(why) => {
                                return Err(ProbeError::ProtocolViolation(format!(
                                    "stalled twice: {why}"
                                )))
                            }
                        }
                    }
                };
                if r.check.lost > 0 {
                    let replay = format!(
                        "pmemvm bench crash --engine {} --end {} --vcpus {} --seed {} --first-round {round} --rounds 1",
                        case.name(),
                        end.name(),
                        config.vcpus,
                        config.seed
                    );
                    eprintln!(
                        "{} {} round {round}: {} acknowledged records lost: {:?}\n  replay: {replay}",
                        case.name(),
                        end.name(),
                        r.check.lost,
                        r.check.first_losses
                    );
                    failures.push(replay);
                }
                s.rounds.push(r);
                progress.step(&s, i + 1);
            }
            series.push(s);
        }
    }
    Ok(CrashReport {
        bench: "crash".into(),
        vcpus: config.vcpus,
        seed: config.seed,
        region_pages: layout.region_pages,
        max_delay_us: config.max_delay.as_micros() as u64,
        flush_mask: config.flush_mask,
        series,
        failures,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// Progress on stderr: one updated line on a terminal, else a line per
/// tenth of the rounds.
struct Progress {
    on: bool,
    tty: bool,
    every: u32,
    rounds: u32,
}

impl Progress {
    fn new(on: bool, s: &CrashSeries, rounds: u32) -> Self {
        let p = Self {
            on,
            tty: std::io::stderr().is_terminal(),
            every: (rounds / 10).max(1),
            rounds,
        };
        if on && !p.tty {
            eprintln!("crash: {} {}: {rounds} rounds", s.engine, s.end.name());
        }
        p
    }

    fn step(&self, s: &CrashSeries, done: u32) {
        if !self.on {
            return;
        }
        let line = format!(
            "crash: {} {}: {done}/{} rounds, {} acked, {} lost",
            s.engine,
            s.end.name(),
            self.rounds,
            s.sum(|r| r.check.acked),
            s.lost()
        );
        if self.tty {
            eprint!("\r{line}");
            if done == self.rounds {
                eprintln!();
            }
        } else if done.is_multiple_of(self.every) || done == self.rounds {
            eprintln!("{line}");
        }
    }
}

/// Each thread of process `pid` as "name state wchan", for a report on a
/// VM that stopped making progress.
fn thread_states(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    let mut out: Vec<String> = tasks
        .flatten()
        .map(|t| {
            let read = |f: &str| {
                std::fs::read_to_string(t.path().join(f))
                    .map_or_else(|_| "?".into(), |s| s.trim().to_string())
            };
            let stat = read("stat");
            // The state follows the parenthesised name.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?")
                .to_string();
            format!("{} {state} {}", read("comm"), read("wchan"))
        })
        .collect();
    out.sort();
    out.join(", ")
}

/// The child's console, line by line.
fn lines_of(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// How long a child may take to build its VM, and then to complete its
/// first flush (under a second on either host kind when well).
const START_LIMIT: Duration = Duration::from_secs(60);

/// How a round went: checked, or its VM made no progress (and was killed).
enum RoundEnd {
    Checked(RoundRecord),
    Stalled(String),
}

fn run_round(
    ws: &Workspace,
    config: &CrashBenchConfig,
    layout: CrashLayout,
    case: ProbeCase,
    end: CrashEnd,
    round: u32,
) -> Result<RoundEnd, ProbeError> {
    let started = Instant::now();
    let seed = round_seed(config.seed, case, end, round);
    let name = format!("{}-{}-{round}.img", case.name(), end.name());
    let backing = match (&ws.cut_fs, end) {
        (Some(fs), CrashEnd::Cut) => fs.path(&name),
        _ => ws.scratch.join(&name),
    };
    let acks = ws.scratch.join("acks");
    let flush_log = ws.scratch.join("flushes");
    let exe = std::env::current_exe().map_err(ProbeError::EventLoop)?;
    let mut child = Command::new(exe)
        .args(["bench", "crash-vm", "--engine", case.name()])
        .args(["--vcpus", &layout.vcpus.to_string()])
        .args(["--region-pages", &layout.region_pages.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--flush-mask", &config.flush_mask.to_string()])
        .arg("--backing")
        .arg(&backing)
        .arg("--acks")
        .arg(&acks)
        .arg("--flush-log")
        .arg(&flush_log)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ProbeError::EventLoop)?;
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        return Err(ProbeError::EventLoop(std::io::Error::other(
            "the crash VM's output is not piped",
        )));
    };
    let stdout = lines_of(out);
    let stderr = lines_of(err);
    // Ends the child and says why, with its threads and its stderr. The
    // backing goes too: a rerun of the round must not find this one's
    // durable records under the same name.
    let end_child = |child: &mut Child, why: String| -> String {
        let threads = thread_states(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&backing);
        if let (Some(fs), CrashEnd::Cut) = (&ws.cut_fs, end) {
            fs.forget(&name);
        }
        let log: Vec<String> = stderr.try_iter().collect();
        format!(
            "crash round {round} ({} {}): {why}; its threads were: {threads}; the VM said:\n{}",
            case.name(),
            end.name(),
            log.join("\n")
        )
    };
    let fail =
        |child: &mut Child, why: String| ProbeError::ProtocolViolation(end_child(child, why));
    match stdout.recv_timeout(START_LIMIT) {
        Ok(l) if l == "running" => {}
        Ok(l) => return Err(fail(&mut child, format!("unexpected line {l:?}"))),
        Err(_) => {
            let why = end_child(&mut child, format!("not running after {START_LIMIT:?}"));
            return Ok(RoundEnd::Stalled(why));
        }
    }
    // Syncs before the vCPUs start are the engine's own (prefault's), not
    // flushes.
    let syncs_at_start = match (&ws.cut_fs, end) {
        (Some(fs), CrashEnd::Cut) => fs.sync_log(&name).map_or(0, |l| l.len()),
        _ => 0,
    };
    let go = child.stdin.take().map(|mut stdin| stdin.write_all(b"go\n"));
    if !matches!(go, Some(Ok(()))) {
        return Err(fail(&mut child, "cannot start its vCPUs".into()));
    }
    // The end falls after the first acknowledgement, so that every round
    // has acknowledged records to lose.
    let first_ack = Instant::now();
    loop {
        let acked = AckFile::read(&acks, layout.vcpus).unwrap_or_default();
        if acked.iter().any(|&a| a > 0) {
            break;
        }
        if let Some(st) = child.try_wait().map_err(ProbeError::EventLoop)? {
            return Err(fail(
                &mut child,
                format!("the VM ended before its first flush ({st})"),
            ));
        }
        if first_ack.elapsed() > START_LIMIT {
            let why = end_child(&mut child, format!("no flush completed in {START_LIMIT:?}"));
            return Ok(RoundEnd::Stalled(why));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let max = config.max_delay.as_micros().max(1) as u64;
    let delay = Duration::from_micros(mix(seed) % max);
    std::thread::sleep(delay);
    // Only a full area ends a healthy VM before the end (exit 0).
    if let Some(st) = child.try_wait().map_err(ProbeError::EventLoop)? {
        if !st.success() {
            return Err(fail(&mut child, format!("the VM ended on its own ({st})")));
        }
    }
    // A cut first: from here no sync completes, so no later ack can claim
    // durability; then the process goes too, as in a power loss.
    let image = match (&ws.cut_fs, end) {
        (Some(fs), CrashEnd::Cut) => Some(
            fs.cut(&name)
                .map_err(|e| fail(&mut child, format!("power cut: {e}")))?,
        ),
        _ => None,
    };
    // After a cut the VM may end by itself first: its flushes fail.
    let _ = child.kill();
    child.wait().map_err(ProbeError::EventLoop)?;
    let full_vcpus = stdout.try_iter().filter(|l| l.ends_with(" full")).count() as u64;
    let acked = AckFile::read(&acks, layout.vcpus).map_err(ProbeError::EventLoop)?;
    let flushes = read_flush_log(&flush_log).map_err(ProbeError::EventLoop)?;
    let (check, syncs, pages_synced) = match (&ws.cut_fs, image) {
        (Some(fs), Some(image)) => {
            let mut c = check(&layout, &acked, |p| image.page(p).to_vec());
            let log = fs.sync_log(&name).unwrap_or_default();
            let log = log.get(syncs_at_start..).unwrap_or_default();
            let unlisted = unlisted_pages(log, &flushes);
            if c.lost > 0 || unlisted > 0 {
                eprintln!(
                    "  {} syncs after the start ({syncs_at_start} before), {} flushes logged",
                    log.len(),
                    flushes.len()
                );
                for (i, s) in log.iter().enumerate().rev().take(8) {
                    eprintln!("  file system sync {i}: pages {:?}", s.pages);
                }
                for (i, f) in flushes.iter().enumerate().rev().take(8) {
                    eprintln!("  engine flush {i}: pages {f:?}");
                }
            }
            let pages: u64 = log.iter().map(|s| s.pages.len() as u64).sum();
            let _ = std::fs::remove_file(&backing);
            fs.forget(&name);
            c.count_unlisted(unlisted);
            (c, log.len() as u64, pages)
        }
        _ => {
            let file = std::fs::File::open(&backing).map_err(ProbeError::EventLoop)?;
            let c = check(&layout, &acked, |p| {
                let mut buf = vec![0u8; PAGE as usize];
                // Short reads past the end leave zeroes: a hole.
                let _ = file.read_at(&mut buf, p * PAGE);
                buf
            });
            let _ = std::fs::remove_file(&backing);
            (c, 0, 0)
        }
    };
    Ok(RoundEnd::Checked(RoundRecord {
        round,
        flushes: flushes.len() as u64,
        seed,
        delay_us: delay.as_micros() as u64,
        round_us: started.elapsed().as_micros() as u64,
        check,
        syncs,
        pages_synced,
        full_vcpus,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::super::powercut::SyncRecord;
    use super::*;

    fn sync(pages: &[u64]) -> SyncRecord {
        SyncRecord {
            pages: pages.to_vec(),
            size: 1 << 20,
        }
    }

    #[test]
    fn a_synced_page_its_flushes_did_not_list_is_counted() {
        // Sync 0 carries page 9, written after flush 0 took its set; flush
        // 1 lists it. Page 7 is in no flush: the dirty set dropped it.
        let syncs = [sync(&[1, 2, 9]), sync(&[3, 7]), sync(&[4])];
        let flushes = vec![vec![1, 2], vec![9, 3], vec![4]];
        assert_eq!(unlisted_pages(&syncs, &flushes), 1);
        // Without flush 2's log, sync 1 cannot be checked yet.
        assert_eq!(unlisted_pages(&syncs, &flushes[..2]), 0);
        assert_eq!(unlisted_pages(&syncs, &[]), 0);
        // A re-dirty the log missed: page 2, listed by flush 0, is synced
        // again by sync 2 though flushes 2 and 3 do not list it.
        let syncs = [sync(&[2]), sync(&[5]), sync(&[2, 6]), sync(&[6])];
        let flushes = vec![vec![2], vec![5], vec![6], vec![6]];
        assert_eq!(unlisted_pages(&syncs, &flushes), 1);
        // Logs that do not pair up: the union is all that can be checked.
        let flushes = vec![vec![2], vec![5, 6]];
        assert_eq!(unlisted_pages(&syncs, &flushes), 0);
    }

    #[test]
    fn round_seeds_differ_by_engine_end_and_round() {
        let k = ProbeCase::ENGINES[0];
        let u = ProbeCase::ENGINES[2];
        let a = round_seed(1, k, CrashEnd::Kill, 0);
        assert_eq!(a, round_seed(1, k, CrashEnd::Kill, 0));
        for b in [
            round_seed(1, k, CrashEnd::Cut, 0),
            round_seed(1, u, CrashEnd::Kill, 0),
            round_seed(1, k, CrashEnd::Kill, 1),
            round_seed(2, k, CrashEnd::Kill, 0),
        ] {
            assert_ne!(a, b);
        }
    }
}
