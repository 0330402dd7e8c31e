//! Loading the guest kernel and initrd, and the Linux zero page.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, E820Entry};

/// Offset of the 64-bit entry point from the start of a bzImage's
/// protected-mode kernel (Documentation/x86/boot.rst).
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// initrd_addr_max of kernels that leave it unset.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel image {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel pmemvm can load: expected an uncompressed ELF vmlinux or a bzImage (arch/x86/boot/bzImage)")]
    UnknownImage { path: PathBuf },
    #[error("cannot load kernel {path}: {source}; is it an x86_64 kernel, and does --memory leave room for it?")]
    KernelLoad {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    InitrdOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel; give more --memory")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot write {what} into guest memory: {detail}")]
    GuestWrite { what: &'static str, detail: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Elf,
    BzImage,
}

/// Tells an ELF vmlinux from a bzImage by their magic numbers.
pub fn detect_image(head: &[u8]) -> Option<ImageKind> {
    if head.starts_with(b"\x7fELF") {
        return Some(ImageKind::Elf);
    }
    if head.get(0x202..0x206) == Some(b"HdrS".as_slice())
        && head.get(0x1fe..0x200) == Some([0x55, 0xaa].as_slice())
    {
        return Some(ImageKind::BzImage);
    }
    None
}

#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub kind: ImageKind,
    /// Where the vCPU starts, in 64-bit mode.
    pub entry: u64,
    /// First byte above the kernel image.
    pub end: u64,
    /// The bzImage's own setup header, to start the zero page from.
    pub setup_header: Option<setup_header>,
}

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let open_err = |source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let mut head = vec![0u8; 0x400];
    let n = read_up_to(&mut file, &mut head).map_err(open_err)?;
    let kind = detect_image(&head[..n]).ok_or_else(|| BootError::UnknownImage {
        path: path.to_owned(),
    })?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let result = match kind {
        ImageKind::Elf => Elf::load(mem, None, &mut file, himem),
        ImageKind::BzImage => BzImage::load(mem, None, &mut file, himem),
    }
    .map_err(|source| BootError::KernelLoad {
        path: path.to_owned(),
        source,
    })?;
    let entry = match kind {
        ImageKind::Elf => result.kernel_load.0,
        ImageKind::BzImage => result.kernel_load.0 + BZIMAGE_64BIT_ENTRY,
    };
    Ok(LoadedKernel {
        kind,
        entry,
        end: result.kernel_end,
        setup_header: result.setup_header,
    })
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as the kernel
/// allows, below the end of low RAM and above the kernel.
pub fn initrd_addr(size: u64, kernel_end: u64, low_ram_end: u64, addr_max: u64) -> Option<u64> {
    let top = low_ram_end.min(addr_max.saturating_add(1));
    let start = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= kernel_end).then_some(start)
}

/// Loads the initrd; returns its guest address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<(u64, u64), BootError> {
    let open_err = |source| BootError::InitrdOpen {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let addr_max = match kernel.setup_header {
        Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let low_end = layout::ram_regions(mem_size)[0].1;
    let addr = initrd_addr(size, kernel.end, low_end, addr_max).ok_or(BootError::InitrdTooBig {
        path: path.to_owned(),
        size,
        limit: low_end.min(addr_max),
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::GuestWrite {
            what: "the initrd",
            detail: e.to_string(),
        })?;
    Ok((addr, size))
}

/// Builds the zero page: the kernel's setup header (bzImage) or a fresh one,
/// the command line, the initrd and the e820 map.
pub fn zero_page(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    acpi_rsdp: Option<u64>,
) -> boot_params {
    let mut params = boot_params {
        // Boot protocol 2.14: where the RSDP is, so Linux need not search.
        acpi_rsdp_addr: acpi_rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    params
}

/// Writes the command line and zero page into guest memory.
pub fn write_boot_data(
    mem: &GuestMemoryMmap,
    params: &boot_params,
    cmdline: &str,
) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(|e| BootError::GuestWrite {
            what: "the kernel command line",
            detail: e.to_string(),
        })?;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(params, GuestAddress(layout::ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| BootError::GuestWrite {
        what: "the zero page",
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_images_by_magic() {
        assert_eq!(detect_image(b"\x7fELF\x02\x01"), Some(ImageKind::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x1fe] = 0x55;
        bz[0x1ff] = 0xaa;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_image(&bz), Some(ImageKind::BzImage));
        bz[0x1fe] = 0;
        assert_eq!(detect_image(&bz), None);
        assert_eq!(detect_image(b""), None);
        assert_eq!(detect_image(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let mib = layout::MIB;
        assert_eq!(
            initrd_addr(10_000, 20 * mib, 512 * mib, DEFAULT_INITRD_ADDR_MAX),
            Some((512 * mib - 10_000) & !0xfff)
        );
        // The kernel's limit wins over the top of RAM.
        assert_eq!(
            initrd_addr(4096, 20 * mib, 3 * layout::GIB, DEFAULT_INITRD_ADDR_MAX),
            Some(DEFAULT_INITRD_ADDR_MAX + 1 - 4096)
        );
        // Too big to fit above the kernel, or bigger than memory.
        assert_eq!(initrd_addr(500 * mib, 20 * mib, 512 * mib, u64::MAX), None);
        assert_eq!(initrd_addr(u64::MAX, 0, 512 * mib, u64::MAX), None);
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let kernel = LoadedKernel {
            kind: ImageKind::Elf,
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
        };
        let e820 = layout::e820_map(256 * layout::MIB);
        let p = zero_page(&kernel, 42, Some((0x800_0000, 1234)), &e820, Some(0xe_0000));
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
        assert_eq!(p.e820_entries as usize, e820.len());
        let last = p.e820_table[e820.len() - 1];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (layout::HIMEM_START, 255 * layout::MIB, 1)
        );
    }
}
