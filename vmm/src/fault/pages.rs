//! Page states of one pmem device and the dirty set a flush writes back.
//!
//! Every 4 KiB page is `Absent`, `Clean` (mapped, writes caught) or `Dirty`,
//! the states the kernel's DAX path keeps in its page tables and mapping
//! tree. This is plain data: the engines feed it the faults and dirty
//! reports they see, and take the dirty set when a flush comes.

pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    Absent,
    Clean,
    Dirty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    /// A write fault that may stand for a read: raised by a thread outside
    /// the VMM on the guest's behalf. KVM's async page-fault worker faults
    /// every page in for writing (`get_user_pages_remote(FOLL_WRITE)` in
    /// `async_pf_execute`) whatever the guest's access, when the guest runs
    /// with interrupts on and the page would block. The page must be
    /// mapped writable, so it is dirty, but unverified: its flush compares
    /// it with the file and skips it if nothing changed.
    UnverifiedWrite,
}

/// What serving a fault did to the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Absent, read: now mapped clean, writes caught.
    PopulateRead,
    /// Absent, written: mapped writable and dirty at insert, with no second
    /// fault (vm_insert_mixed_mkwrite).
    PopulateWrite,
    /// Clean, written: the first write since the last flush.
    Mkwrite,
    /// Absent, faulted in writable for a thread that may only read
    /// ([`Access::UnverifiedWrite`]): dirty until a flush finds it
    /// unchanged.
    PopulateUnverified,
    /// Another fault already did the work (a second vCPU on the same page).
    /// Success, not an error: the EBUSY lesson of vm_insert_mixed.
    AlreadyDone,
}

/// A fixed-size bitmap, one bit per page.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn clear(&mut self, i: u64) {
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
    }

    /// Sets bit `i`; returns whether it was already set.
    fn set(&mut self, i: u64) -> bool {
        let w = &mut self.words[(i / 64) as usize];
        let mask = 1 << (i % 64);
        let was = *w & mask != 0;
        *w |= mask;
        was
    }

    fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// The state of every page of one device.
#[derive(Debug, Clone)]
pub struct PageStates {
    present: Bits,
    dirty: Bits,
    /// Dirty pages that may never have been written
    /// ([`Access::UnverifiedWrite`]).
    unverified: Bits,
}

impl PageStates {
    pub fn new(pages: u64) -> Self {
        Self {
            present: Bits::new(pages),
            dirty: Bits::new(pages),
            unverified: Bits::new(pages),
        }
    }

    pub fn pages(&self) -> u64 {
        self.present.len
    }

    fn check(&self, page: u64) -> Option<()> {
        (page < self.pages()).then_some(())
    }

    /// `None` for a page past the end.
    pub fn state(&self, page: u64) -> Option<PageState> {
        self.check(page)?;
        Some(if self.dirty.get(page) {
            PageState::Dirty
        } else if self.present.get(page) {
            PageState::Clean
        } else {
            PageState::Absent
        })
    }

    /// Applies a fault on `page`. `None` for a page past the end.
    pub fn fault(&mut self, page: u64, access: Access) -> Option<Transition> {
        let before = self.state(page)?;
        self.present.set(page);
        Some(match (before, access) {
            (PageState::Absent, Access::Read) => Transition::PopulateRead,
            (PageState::Absent, Access::Write) => {
                self.dirty.set(page);
                Transition::PopulateWrite
            }
            (PageState::Absent, Access::UnverifiedWrite) => {
                self.dirty.set(page);
                self.unverified.set(page);
                Transition::PopulateUnverified
            }
            (PageState::Clean, Access::Write | Access::UnverifiedWrite) => {
                if access == Access::UnverifiedWrite {
                    self.unverified.set(page);
                }
                self.dirty.set(page);
                Transition::Mkwrite
            }
            (PageState::Clean, Access::Read) | (PageState::Dirty, _) => Transition::AlreadyDone,
        })
    }

    /// Records a write that an engine learnt of after the fact (KVM's dirty
    /// log). Returns false for a page past the end.
    pub fn mark_dirty(&mut self, page: u64) -> bool {
        if self.check(page).is_none() {
            return false;
        }
        self.present.set(page);
        self.dirty.set(page);
        self.unverified.clear(page);
        true
    }

    /// Records a report of a write that may stand for a read: KVM's dirty
    /// log of a shmem mapping (the mirror engine's memfd) also reports the
    /// guest's first read of a page, since KVM maps a page writable for a
    /// read when the host has it writable, and shmem maps shared pages
    /// writable on read faults. Only the first report of a page can be
    /// such a read: the harvest write-protects the page in KVM's map, so a
    /// later report is a write. The page is dirty, and if it was never
    /// reported before (`Absent`), unverified: its flush compares it with
    /// the file. Returns false for a page past the end.
    pub fn mark_maybe_written(&mut self, page: u64) -> bool {
        if self.check(page).is_none() {
            return false;
        }
        if !self.present.set(page) {
            self.unverified.set(page);
        }
        self.dirty.set(page);
        true
    }

    /// Starts a writeback: every dirty page becomes clean (writes caught
    /// again) and is returned. A write that lands after this is dirty for the
    /// next flush; the caller re-arms the catch before it copies data out.
    pub fn take_dirty(&mut self) -> DirtySet {
        let len = self.dirty.len;
        DirtySet {
            bits: std::mem::replace(&mut self.dirty, Bits::new(len)),
            unverified: std::mem::replace(&mut self.unverified, Bits::new(len)),
        }
    }

    /// A failed writeback: its pages are dirty again, for the next flush.
    pub fn redirty(&mut self, set: &DirtySet) {
        for (mine, theirs) in self.dirty.words.iter_mut().zip(&set.bits.words) {
            *mine |= theirs;
        }
        for (mine, theirs) in self.unverified.words.iter_mut().zip(&set.unverified.words) {
            *mine |= theirs;
        }
        for (mine, theirs) in self.present.words.iter_mut().zip(&set.bits.words) {
            *mine |= theirs;
        }
    }

    /// (absent, clean, dirty) page counts.
    pub fn counts(&self) -> (u64, u64, u64) {
        let present = self.present.count();
        let dirty = self.dirty.count();
        (self.pages() - present, present - dirty, dirty)
    }
}

/// A run of consecutive dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub pages: u64,
}

impl Run {
    pub fn offset(&self) -> u64 {
        self.first * PAGE_SIZE
    }

    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }
}

/// The pages one writeback must make durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    bits: Bits,
    /// The pages of `bits` that may never have been written.
    unverified: Bits,
}

impl DirtySet {
    /// Drops each unverified page for which `unchanged` says the data is
    /// still what the file holds; returns how many were dropped. An error
    /// keeps the page in the set.
    pub fn drop_unchanged<E>(
        &mut self,
        mut unchanged: impl FnMut(u64) -> Result<bool, E>,
    ) -> Result<u64, E> {
        let mut dropped = 0;
        for w in 0..self.unverified.words.len() {
            let mut bits = self.unverified.words[w];
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if unchanged(page)? {
                    self.bits.clear(page);
                    dropped += 1;
                }
                self.unverified.clear(page);
            }
        }
        Ok(dropped)
    }

    pub fn len(&self) -> u64 {
        self.bits.count()
    }

    pub fn is_empty(&self) -> bool {
        self.bits.words.iter().all(|&w| w == 0)
    }

    pub fn contains(&self, page: u64) -> bool {
        page < self.bits.len && self.bits.get(page)
    }

    /// Consecutive dirty pages coalesced into runs of at most `max_pages`
    /// (bounding one I/O), in page order.
    pub fn runs(&self, max_pages: u64) -> Runs<'_> {
        Runs {
            words: &self.bits.words,
            next: 0,
            end: self.bits.len,
            max: max_pages.max(1),
        }
    }
}

pub struct Runs<'a> {
    words: &'a [u64],
    next: u64,
    end: u64,
    max: u64,
}

impl Runs<'_> {
    /// First page at or after `from` whose bit equals `set`, or `end`.
    fn next_bit(&self, from: u64, set: bool) -> u64 {
        let mut i = from;
        while i < self.end {
            let w = self.words[(i / 64) as usize];
            let w = if set { w } else { !w } >> (i % 64);
            if w != 0 {
                return (i + u64::from(w.trailing_zeros())).min(self.end);
            }
            i = (i / 64 + 1) * 64;
        }
        self.end
    }
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        let first = self.next_bit(self.next, true);
        if first >= self.end {
            self.next = self.end;
            return None;
        }
        let stop = self
            .next_bit(first, false)
            .min(first.saturating_add(self.max));
        self.next = stop;
        Some(Run {
            first,
            pages: stop - first,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_dax_fault_path() {
        let mut s = PageStates::new(8);
        assert_eq!(s.state(0), Some(PageState::Absent));
        assert_eq!(s.fault(0, Access::Read), Some(Transition::PopulateRead));
        assert_eq!(s.state(0), Some(PageState::Clean));
        assert_eq!(s.fault(0, Access::Read), Some(Transition::AlreadyDone));
        assert_eq!(s.fault(0, Access::Write), Some(Transition::Mkwrite));
        assert_eq!(s.state(0), Some(PageState::Dirty));
        assert_eq!(s.fault(0, Access::Write), Some(Transition::AlreadyDone));
        assert_eq!(s.fault(1, Access::Write), Some(Transition::PopulateWrite));
        assert_eq!(s.state(1), Some(PageState::Dirty));
        assert_eq!(s.counts(), (6, 0, 2));

        let set = s.take_dirty();
        assert_eq!(set.len(), 2);
        assert_eq!(s.state(0), Some(PageState::Clean));
        assert_eq!(s.state(1), Some(PageState::Clean));
        // The catch is armed again: the next write is a mkwrite.
        assert_eq!(s.fault(1, Access::Write), Some(Transition::Mkwrite));
        assert_eq!(s.counts(), (6, 1, 1));
    }

    #[test]
    fn unverified_writes_are_dirty_until_a_flush_finds_them_unchanged() {
        let mut s = PageStates::new(200);
        assert_eq!(
            s.fault(3, Access::UnverifiedWrite),
            Some(Transition::PopulateUnverified)
        );
        assert_eq!(
            s.fault(130, Access::UnverifiedWrite),
            Some(Transition::PopulateUnverified)
        );
        assert_eq!(s.fault(4, Access::Write), Some(Transition::PopulateWrite));
        assert_eq!(s.fault(5, Access::Read), Some(Transition::PopulateRead));
        assert_eq!(
            s.fault(5, Access::UnverifiedWrite),
            Some(Transition::Mkwrite)
        );
        assert_eq!(s.state(3), Some(PageState::Dirty));
        // A write the dirty log reports is a known write.
        s.mark_dirty(130);
        let mut set = s.take_dirty();
        let mut asked = Vec::new();
        // Page 3 is unchanged, page 5 was written.
        let dropped = set
            .drop_unchanged(|p| {
                asked.push(p);
                Ok::<_, ()>(p == 3)
            })
            .unwrap();
        assert_eq!((asked, dropped), (vec![3, 5], 1));
        let pages: Vec<u64> = (0..200).filter(|&p| set.contains(p)).collect();
        assert_eq!(pages, vec![4, 5, 130]);
        assert_eq!(
            set.drop_unchanged(|_| Ok::<_, ()>(true)),
            Ok(0),
            "asked once"
        );
        // After a flush the page is clean, and the next write is a mkwrite.
        assert_eq!(s.state(3), Some(PageState::Clean));
        assert_eq!(s.fault(3, Access::Write), Some(Transition::Mkwrite));
        // A failed check keeps the page; a failed flush keeps it unverified.
        s.fault(7, Access::UnverifiedWrite);
        let mut set = s.take_dirty();
        assert_eq!(
            set.drop_unchanged(|p| if p == 7 { Err("io") } else { Ok(false) }),
            Err("io")
        );
        assert!(set.contains(7));
        s.redirty(&set);
        let mut again = s.take_dirty();
        assert_eq!(again.drop_unchanged(|_| Ok::<_, ()>(true)), Ok(1));
        assert!(!again.contains(7) && again.contains(3));
    }

    #[test]
    fn only_the_first_report_of_a_page_may_be_a_read() {
        let mut s = PageStates::new(8);
        assert!(s.mark_maybe_written(1));
        assert!(s.mark_maybe_written(1));
        // An emulated store, seen as a write, then logged.
        s.mark_dirty(2);
        assert!(s.mark_maybe_written(2));
        assert_eq!(s.counts(), (6, 0, 2));
        let mut set = s.take_dirty();
        let mut asked = Vec::new();
        set.drop_unchanged(|p| {
            asked.push(p);
            Ok::<_, ()>(true)
        })
        .unwrap();
        assert_eq!(asked, vec![1]);
        assert!(!set.contains(1) && set.contains(2));
        // Reported again after a flush: a write, not compared.
        s.mark_maybe_written(1);
        let mut set = s.take_dirty();
        assert_eq!(set.drop_unchanged(|_| Ok::<_, ()>(true)), Ok(0));
        assert!(set.contains(1));
        assert!(!s.mark_maybe_written(8));
    }

    #[test]
    fn out_of_range_pages_are_refused() {
        let mut s = PageStates::new(3);
        assert_eq!(s.state(3), None);
        assert_eq!(s.fault(3, Access::Write), None);
        assert!(!s.mark_dirty(u64::MAX));
        assert_eq!(s.counts(), (3, 0, 0));
    }

    #[test]
    fn a_failed_writeback_leaves_pages_dirty_with_later_writes() {
        let mut s = PageStates::new(130);
        s.mark_dirty(5);
        s.mark_dirty(129);
        let set = s.take_dirty();
        // A write racing the writeback lands after take_dirty.
        s.fault(7, Access::Write);
        s.redirty(&set);
        let again = s.take_dirty();
        let pages: Vec<u64> = (0..130).filter(|&p| again.contains(p)).collect();
        assert_eq!(pages, vec![5, 7, 129]);
        assert!(s.take_dirty().is_empty(), "a flush with nothing dirty");
    }

    #[test]
    fn runs_coalesce_and_split() {
        let mut s = PageStates::new(300);
        for p in [0, 1, 2, 63, 64, 65, 200] {
            s.mark_dirty(p);
        }
        for p in 250..300 {
            s.mark_dirty(p);
        }
        let set = s.take_dirty();
        let runs: Vec<(u64, u64)> = set.runs(512).map(|r| (r.first, r.pages)).collect();
        assert_eq!(runs, vec![(0, 3), (63, 3), (200, 1), (250, 50)]);
        let capped: Vec<(u64, u64)> = set.runs(20).map(|r| (r.first, r.pages)).collect();
        assert_eq!(
            capped,
            vec![(0, 3), (63, 3), (200, 1), (250, 20), (270, 20), (290, 10)]
        );
        let r = set.runs(512).nth(1).unwrap();
        assert_eq!((r.offset(), r.bytes()), (63 * 4096, 3 * 4096));
        assert_eq!(set.len(), 57);
        assert_eq!(PageStates::new(10).take_dirty().runs(8).count(), 0);
        // No cap: one run per stretch, and no overflow past the last page.
        let whole: Vec<(u64, u64)> = set.runs(u64::MAX).map(|r| (r.first, r.pages)).collect();
        assert_eq!(whole, runs);
    }

    #[test]
    fn runs_match_a_naive_scan() {
        // Pseudo-random patterns against a page-by-page reference.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [1u64, 63, 64, 65, 1000] {
            let mut s = PageStates::new(len);
            let mut want = vec![false; len as usize];
            for p in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x.is_multiple_of(3) {
                    s.mark_dirty(p);
                    want[p as usize] = true;
                }
            }
            let set = s.take_dirty();
            let mut got = vec![false; len as usize];
            let mut last_end = None;
            for r in set.runs(7) {
                assert!(r.pages >= 1 && r.pages <= 7);
                if let Some(end) = last_end {
                    assert!(r.first >= end);
                }
                last_end = Some(r.first + r.pages);
                for p in r.first..r.first + r.pages {
                    got[p as usize] = true;
                }
            }
            assert_eq!(got, want, "len {len}");
        }
    }
}
