//! `pmemvm bench crash`: crash consistency without a Linux guest.
//!
//! A crash VM ([`vm::CrashVm`]) runs the probe code's crash routine on 1 to
//! 4 vCPUs: each appends checksummed records to its own pages of the pmem
//! region, stores its newest sequence number in a shared page, and sends
//! flush requests; when one completes it acknowledges the sequence number
//! it covered to the VMM, which writes it to an ack file at once. The bench
//! ([`bench`]) runs each VM in a child process, ends it at a random moment
//! (SIGKILL, or a power cut of the file system under the backing file,
//! [`super::powercut`]) and then checks the backing: every acknowledged
//! record must be there, intact ([`check`]).

pub mod bench;
pub mod vm;

use super::guest::{crash_record, record_tag, RECORD_SIZE};
use super::paging::PAGE;

/// Records per 4 KiB page.
pub const RECORDS_PER_PAGE: u64 = PAGE / RECORD_SIZE;
/// The most vCPUs a crash VM runs.
pub const MAX_VCPUS: u8 = 4;

/// Where each vCPU's records go in the pmem region: page 0 is the shared
/// page (vCPU `v`'s slot is its u64 at byte `8 * v`, all in one cache
/// line); the rest is split into one area per vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CrashLayout {
    pub vcpus: u8,
    pub region_pages: u64,
}

impl CrashLayout {
    /// Pages of each vCPU's area.
    pub fn area_pages(&self) -> u64 {
        (self.region_pages - 1) / u64::from(self.vcpus)
    }

    /// First page of vCPU `v`'s area.
    pub fn area_first_page(&self, v: u8) -> u64 {
        1 + u64::from(v) * self.area_pages()
    }

    /// Record slots per area.
    pub fn records(&self) -> u64 {
        self.area_pages() * RECORDS_PER_PAGE
    }

    /// Byte offset, in the region, of vCPU `v`'s record `seq` (from 1).
    #[cfg(test)]
    pub fn record_offset(&self, v: u8, seq: u64) -> u64 {
        self.area_first_page(v) * PAGE + (seq - 1) * RECORD_SIZE
    }
}

/// What one ended VM left in its backing, against what it acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoundCheck {
    /// Records acknowledged (the sum of each vCPU's last acked seq).
    pub acked: u64,
    /// Intact records found, acknowledged or not.
    pub intact: u64,
    /// Acknowledged records missing or damaged: must be 0.
    pub lost: u64,
    /// Intact records past their vCPU's last acknowledgement.
    pub unacked_found: u64,
    /// Records past the acknowledgement that are neither absent nor intact:
    /// a record the VM was writing (eight stores) when it ended.
    pub torn: u64,
    /// vCPUs whose shared-page slot is older than their acknowledgement,
    /// or holds a value they never wrote (an 8-byte store torn).
    pub shared_behind: u64,
    /// Power cut: pages a sync made durable that no engine flush listed
    /// (counted in `lost` too).
    pub unlisted_pages: u64,
    /// The first losses, for the failure report: (vCPU, seq, why).
    pub first_losses: Vec<(u8, u64, String)>,
}

impl RoundCheck {
    /// Counts `pages` a sync made durable that no engine flush listed as
    /// lost too, and says so among the first losses.
    pub fn count_unlisted(&mut self, pages: u64) {
        self.unlisted_pages = pages;
        if pages > 0 {
            self.lost += pages;
            self.first_losses.push((
                0,
                0,
                format!(
                    "{pages} pages reached the file in a sync but in no flush the engine logged"
                ),
            ));
        }
    }
}

/// How many losses a report spells out.
const LOSSES_SHOWN: usize = 5;

/// What a record slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Absent,
    Intact,
    Torn,
}

fn classify(bytes: &[u8], seq: u64, tag: u64) -> Slot {
    if bytes.iter().all(|&b| b == 0) {
        return Slot::Absent;
    }
    let want = crash_record(seq, tag);
    let intact = bytes
        .chunks_exact(8)
        .zip(want)
        .all(|(c, w)| c == w.to_le_bytes());
    if intact {
        Slot::Intact
    } else {
        Slot::Torn
    }
}

/// Checks a backing image against the acknowledgements: `acks[v]` is vCPU
/// `v`'s last acknowledged seq (0: none), `page(i)` reads page `i` of the
/// region as it survived (zeroes for a hole or past the end). Pages past
/// the acknowledgement may have holes: a page re-dirtied after the last
/// completed flush need not have reached the file.
pub fn check(layout: &CrashLayout, acks: &[u64], page: impl Fn(u64) -> Vec<u8>) -> RoundCheck {
    let mut c = RoundCheck::default();
    let shared = page(0);
    for v in 0..layout.vcpus {
        let acked = acks.get(usize::from(v)).copied().unwrap_or(0);
        c.acked += acked;
        let tag = record_tag(v);
        let lose = |c: &mut RoundCheck, seq: u64, why: String| {
            c.lost += 1;
            if c.first_losses.len() < LOSSES_SHOWN {
                c.first_losses.push((v, seq, why));
            }
        };
        let first = layout.area_first_page(v);
        let mut seq = 1;
        'pages: for p in 0..layout.area_pages() {
            let bytes = page(first + p);
            if seq > acked && bytes.iter().all(|&b| b == 0) {
                seq += RECORDS_PER_PAGE;
                continue;
            }
            for record in bytes.chunks_exact(RECORD_SIZE as usize) {
                match (classify(record, seq, tag), seq <= acked) {
                    (Slot::Intact, true) => c.intact += 1,
                    (Slot::Intact, false) => {
                        c.intact += 1;
                        c.unacked_found += 1;
                    }
                    (Slot::Absent, true) => lose(&mut c, seq, "absent".into()),
                    (Slot::Torn, true) => lose(&mut c, seq, "damaged".into()),
                    (Slot::Absent, false) => {}
                    (Slot::Torn, false) => c.torn += 1,
                }
                seq += 1;
                if seq > layout.records() {
                    break 'pages;
                }
            }
        }
        let at = usize::from(v) * 8;
        let slot = u64::from_le_bytes(shared[at..at + 8].try_into().unwrap_or([0; 8]));
        // One 8-byte store: it holds a seq the vCPU wrote, never a mix.
        if slot < acked || slot > layout.records() {
            c.shared_behind += 1;
            lose(
                &mut c,
                acked,
                format!("shared slot holds {slot}, acknowledged {acked}"),
            );
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(layout: &CrashLayout, written: &[u64]) -> Vec<u8> {
        let mut img = vec![0u8; (layout.region_pages * PAGE) as usize];
        for (v, &n) in written.iter().enumerate() {
            let v = v as u8;
            for seq in 1..=n {
                let at = layout.record_offset(v, seq) as usize;
                for (i, w) in crash_record(seq, record_tag(v)).iter().enumerate() {
                    img[at + i * 8..at + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
                }
            }
            img[usize::from(v) * 8..usize::from(v) * 8 + 8].copy_from_slice(&n.to_le_bytes());
        }
        img
    }

    fn run(layout: &CrashLayout, img: &[u8], acks: &[u64]) -> RoundCheck {
        check(layout, acks, |p| {
            let at = (p * PAGE) as usize;
            img.get(at..at + PAGE as usize)
                .map_or_else(|| vec![0; PAGE as usize], <[u8]>::to_vec)
        })
    }

    const LAYOUT: CrashLayout = CrashLayout {
        vcpus: 2,
        region_pages: 64,
    };

    #[test]
    fn layout_splits_the_region_after_the_shared_page() {
        assert_eq!(LAYOUT.area_pages(), 31);
        assert_eq!(LAYOUT.area_first_page(0), 1);
        assert_eq!(LAYOUT.area_first_page(1), 32);
        assert_eq!(LAYOUT.records(), 31 * 64);
        assert_eq!(LAYOUT.record_offset(1, 65), 33 * PAGE);
    }

    #[test]
    fn everything_acknowledged_and_more_written_is_clean() {
        let img = image(&LAYOUT, &[200, 70]);
        let c = run(&LAYOUT, &img, &[150, 70]);
        assert_eq!(c.lost, 0, "{c:?}");
        assert_eq!(c.acked, 220);
        assert_eq!(c.intact, 270);
        assert_eq!(c.unacked_found, 50);
        assert_eq!(c.torn, 0);
        assert_eq!(c.shared_behind, 0);
    }

    #[test]
    fn a_missing_acknowledged_record_is_a_loss() {
        let mut img = image(&LAYOUT, &[100, 10]);
        // Record 65 of vCPU 0 is the first of its second page: drop the
        // page, as a writeback that skipped it would.
        let at = LAYOUT.record_offset(0, 65) as usize;
        img[at..at + PAGE as usize].fill(0);
        let c = run(&LAYOUT, &img, &[90, 10]);
        assert_eq!(c.lost, 26, "{c:?}");
        assert_eq!(c.first_losses[0], (0, 65, "absent".to_string()));
    }

    #[test]
    fn a_torn_record_is_a_loss_only_when_acknowledged() {
        let mut img = image(&LAYOUT, &[10, 0]);
        let at = LAYOUT.record_offset(0, 10) as usize;
        img[at + 56..at + 64].fill(0);
        assert_eq!(run(&LAYOUT, &img, &[9, 0]).torn, 1);
        assert_eq!(run(&LAYOUT, &img, &[9, 0]).lost, 0);
        let c = run(&LAYOUT, &img, &[10, 0]);
        assert_eq!(c.lost, 1);
        assert_eq!(c.first_losses[0].2, "damaged");
    }

    #[test]
    fn a_shared_slot_behind_its_acknowledgement_is_a_loss() {
        let mut img = image(&LAYOUT, &[10, 5]);
        img[8..16].copy_from_slice(&3u64.to_le_bytes());
        let c = run(&LAYOUT, &img, &[10, 4]);
        assert_eq!(c.shared_behind, 1, "{c:?}");
        assert_eq!(c.lost, 1);
    }

    #[test]
    fn a_hole_left_by_the_cut_past_the_acknowledgement_is_fine() {
        let mut img = image(&LAYOUT, &[300, 0]);
        // Pages 3 and 4 of the area written back, page 2 not (it was
        // re-dirtied after the last acknowledged flush).
        let at = LAYOUT.record_offset(0, 129) as usize;
        img[at..at + PAGE as usize].fill(0);
        img[..8].copy_from_slice(&400u64.to_le_bytes());
        let c = run(&LAYOUT, &img, &[100, 0]);
        assert_eq!(c.lost, 0, "{c:?}");
        assert_eq!(c.unacked_found, 200 - 64);
    }
}
