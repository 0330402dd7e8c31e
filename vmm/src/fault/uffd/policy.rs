//! The uffd engine's decisions, as pure functions of the page states: what
//! serving a fault does, and which ranges a flush write-protects. The
//! servicer and the flush carry them out with userfaultfd ioctls; nothing
//! here touches the kernel.

use crate::fault::{Access, DirtySet, PageState, PageStates};

/// Which userfaultfd event a fault is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The page is not in the mirror.
    Missing,
    /// A write to a write-protected page.
    WriteProtect,
}

/// A fault as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub page: u64,
    pub kind: FaultKind,
    /// What the faulting thread asked for; a write-protect fault is always
    /// a write.
    pub access: Access,
}

/// The device's fixed settings that decisions depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub pages: u64,
    /// Pages inserted per missing fault: the aligned block around it.
    pub populate: u64,
    pub readonly: bool,
    /// The file is never written, so no blocks are reserved in it.
    pub discard_writes: bool,
}

/// What serving one fault does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub page: u64,
    /// The access the page's state records.
    pub access: Access,
    /// Reserve the page's blocks in the file first (page_mkwrite, seeds
    /// 004): it is about to become writable, and a later writeback must not
    /// fail for lack of space.
    pub reserve: bool,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The page is in place already: another fault inserted it, which is
    /// success (EBUSY/EEXIST, seeds 000). Wake the faulting thread.
    Wake,
    /// The first write to a present page: lift its protection (which wakes
    /// the writer); it becomes dirty.
    Unprotect,
    /// Load these absent pages from the file and insert them, in page
    /// order, under one states lock.
    Copy(Vec<Span>),
}

/// Consecutive absent pages inserted by one UFFDIO_COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first: u64,
    pub pages: u64,
    /// Catch the first write. Every page but the one a write faulted on,
    /// which is inserted writable and dirty (vm_insert_mixed_mkwrite, seeds
    /// 003). Never on a read-only device: its mirror is mapped PROT_READ
    /// and not registered for write protection.
    pub write_protect: bool,
}

/// Decides how to serve `fault`, given the page states of this moment.
pub fn plan(states: &PageStates, region: &Region, fault: Fault) -> Plan {
    let page = fault.page;
    // Nothing is written on a read-only device. A write-protect fault is a
    // write whoever raises it: a read of a protected page does not fault.
    let access = match fault.kind {
        _ if region.readonly => Access::Read,
        FaultKind::WriteProtect => Access::Write,
        FaultKind::Missing => fault.access,
    };
    let writable = access != Access::Read;
    let reserve = writable && !region.discard_writes;
    let action = match (states.state(page), fault.kind) {
        // A write-protect fault on an absent page is not expected (absent
        // pages are never protected): populate, as for a write.
        (Some(PageState::Absent), _) => Action::Copy(copy_spans(states, region, page, writable)),
        (Some(_), FaultKind::WriteProtect) if !region.readonly => Action::Unprotect,
        // Present already, or past the end (the servicer drops those).
        _ => Action::Wake,
    };
    let reserve = reserve && action != Action::Wake;
    Plan {
        page,
        access,
        reserve,
        action,
    }
}

/// The absent pages of the `populate` block around `page`, clipped to the
/// region, in spans of one protection: present pages stay as they are.
fn copy_spans(states: &PageStates, region: &Region, page: u64, writable: bool) -> Vec<Span> {
    let first = page - page % region.populate.max(1);
    let end = (first + region.populate.max(1)).min(region.pages);
    let write_protect = |p: u64| !(region.readonly || (writable && p == page));
    let mut spans: Vec<Span> = Vec::new();
    for p in first..end {
        if states.state(p) != Some(PageState::Absent) {
            continue;
        }
        let wp = write_protect(p);
        match spans.last_mut() {
            Some(s) if s.first + s.pages == p && s.write_protect == wp => s.pages += 1,
            _ => spans.push(Span {
                first: p,
                pages: 1,
                write_protect: wp,
            }),
        }
    }
    spans
}

/// The ranges to write-protect for a flush of `set`: its runs, merged across
/// gaps of clean pages, which are protected already. One ioctl per span
/// instead of one per run keeps a scattered flush from paying per page.
pub fn protect_spans(states: &PageStates, set: &DirtySet, pages: u64) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for run in set.runs(pages) {
        if let Some((first, len)) = spans.last_mut() {
            let end = *first + *len;
            if (end..run.first).all(|p| states.state(p) == Some(PageState::Clean)) {
                *len = run.first + run.pages - *first;
                continue;
            }
        }
        spans.push((run.first, run.pages));
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGION: Region = Region {
        pages: 64,
        populate: 16,
        readonly: false,
        discard_writes: false,
    };

    fn missing(page: u64, access: Access) -> Fault {
        Fault {
            page,
            kind: FaultKind::Missing,
            access,
        }
    }

    fn wp(page: u64) -> Fault {
        Fault {
            page,
            kind: FaultKind::WriteProtect,
            access: Access::Write,
        }
    }

    fn span(first: u64, pages: u64, write_protect: bool) -> Span {
        Span {
            first,
            pages,
            write_protect,
        }
    }

    fn copy(page: u64, access: Access, reserve: bool, spans: Vec<Span>) -> Plan {
        Plan {
            page,
            access,
            reserve,
            action: Action::Copy(spans),
        }
    }

    #[test]
    fn a_missing_read_copies_its_block_write_protected() {
        let states = PageStates::new(64);
        assert_eq!(
            plan(&states, &REGION, missing(20, Access::Read)),
            copy(20, Access::Read, false, vec![span(16, 16, true)])
        );
    }

    #[test]
    fn a_missing_write_reserves_and_inserts_its_page_writable() {
        let states = PageStates::new(64);
        assert_eq!(
            plan(&states, &REGION, missing(5, Access::Write)),
            copy(
                5,
                Access::Write,
                true,
                vec![span(0, 5, true), span(5, 1, false), span(6, 10, true)]
            )
        );
        // A write that may stand for a read is inserted the same way.
        let p = plan(&states, &REGION, missing(0, Access::UnverifiedWrite));
        assert_eq!(
            p,
            copy(
                0,
                Access::UnverifiedWrite,
                true,
                vec![span(0, 1, false), span(1, 15, true)]
            )
        );
    }

    #[test]
    fn a_write_protect_fault_on_a_present_page_reserves_and_unprotects() {
        let mut states = PageStates::new(64);
        states.fault(7, Access::Read);
        let want = Plan {
            page: 7,
            access: Access::Write,
            reserve: true,
            action: Action::Unprotect,
        };
        assert_eq!(plan(&states, &REGION, wp(7)), want);
        // Dirty, yet protected by a flush that then failed: the same.
        states.fault(7, Access::Write);
        assert_eq!(plan(&states, &REGION, wp(7)), want);
    }

    #[test]
    fn a_write_protect_fault_on_an_absent_page_populates_as_a_write() {
        let states = PageStates::new(64);
        assert_eq!(
            plan(&states, &REGION, wp(31)),
            copy(
                31,
                Access::Write,
                true,
                vec![span(16, 15, true), span(31, 1, false)]
            )
        );
    }

    #[test]
    fn a_missing_fault_on_a_present_page_only_wakes() {
        let mut states = PageStates::new(64);
        states.fault(3, Access::Read);
        states.fault(4, Access::Write);
        for (page, access) in [(3, Access::Read), (3, Access::Write), (4, Access::Write)] {
            assert_eq!(
                plan(&states, &REGION, missing(page, access)),
                Plan {
                    page,
                    access,
                    reserve: false,
                    action: Action::Wake,
                },
                "page {page} {access:?}"
            );
        }
    }

    #[test]
    fn a_read_only_device_never_maps_a_page_writable() {
        let region = Region {
            readonly: true,
            ..REGION
        };
        let mut states = PageStates::new(64);
        for access in [Access::Read, Access::Write, Access::UnverifiedWrite] {
            assert_eq!(
                plan(&states, &region, missing(40, access)),
                copy(40, Access::Read, false, vec![span(32, 16, false)])
            );
        }
        states.fault(40, Access::Read);
        assert_eq!(plan(&states, &region, wp(40)).action, Action::Wake);
        assert!(!plan(&states, &region, wp(40)).reserve);
    }

    #[test]
    fn discard_writes_reserves_nothing_but_still_catches_writes() {
        let region = Region {
            discard_writes: true,
            ..REGION
        };
        let mut states = PageStates::new(64);
        assert_eq!(
            plan(&states, &region, missing(17, Access::Write)),
            copy(
                17,
                Access::Write,
                false,
                vec![span(16, 1, true), span(17, 1, false), span(18, 14, true)]
            )
        );
        states.fault(17, Access::Read);
        assert_eq!(
            plan(&states, &region, wp(17)),
            Plan {
                page: 17,
                access: Access::Write,
                reserve: false,
                action: Action::Unprotect,
            }
        );
    }

    #[test]
    fn the_block_is_clipped_at_the_region_end_and_skips_present_pages() {
        let region = Region {
            pages: 512,
            populate: 3,
            ..REGION
        };
        let mut states = PageStates::new(512);
        assert_eq!(
            plan(&states, &region, missing(511, Access::Read)),
            copy(511, Access::Read, false, vec![span(510, 2, true)])
        );
        states.fault(4, Access::Read);
        assert_eq!(
            plan(&states, &region, missing(3, Access::Read)),
            copy(
                3,
                Access::Read,
                false,
                vec![span(3, 1, true), span(5, 1, true)]
            )
        );
        states.fault(3, Access::Read);
        states.fault(5, Access::Read);
        assert_eq!(
            plan(&states, &region, missing(5, Access::Read)).action,
            Action::Wake
        );
    }

    #[test]
    fn a_page_past_the_end_only_wakes() {
        let states = PageStates::new(64);
        for fault in [missing(64, Access::Write), wp(u64::MAX)] {
            let p = plan(&states, &REGION, fault);
            assert_eq!(p.action, Action::Wake, "{fault:?}");
            assert!(!p.reserve);
        }
    }

    #[test]
    fn protect_spans_merge_across_clean_gaps_only() {
        let mut states = PageStates::new(16);
        for p in 0..8 {
            states.fault(p, Access::Read);
        }
        for p in [1, 3, 5, 10, 12] {
            states.fault(p, Access::Write);
        }
        let set = states.take_dirty();
        // 1..6 merge over clean 2 and 4; 10 and 12 stay apart (11 absent).
        assert_eq!(
            protect_spans(&states, &set, 512),
            vec![(1, 5), (10, 1), (12, 1)]
        );
    }
}
