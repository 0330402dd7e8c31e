//! Loading the guest kernel and initrd, and the Linux zero page.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

pub mod payload;

use self::payload::Compression;
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
    /// For a bzImage, the compression of its payload when pmemvm
    /// decompressed it on the host and loaded the vmlinux inside; `None`
    /// when the bzImage itself was loaded and decompresses itself.
    pub host_decompressed: Option<Compression>,
    /// Where the vCPU starts, in 64-bit mode: the ELF entry of a vmlinux
    /// (also one decompressed on the host), else the bzImage's 64-bit entry.
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
    let load_err = |source| BootError::KernelLoad {
        path: path.to_owned(),
        source,
    };
    if kind == ImageKind::Elf {
        let result = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
        return Ok(LoadedKernel {
            kind,
            host_decompressed: None,
            entry: result.kernel_load.0,
            end: result.kernel_end,
            setup_header: None,
        });
    }
    match load_host_decompressed(mem, &mut file) {
        Ok(kernel) => return Ok(kernel),
        Err(why) => log::warn!(
            "kernel: {}: {why}; the guest's decompressor will run instead",
            path.display()
        ),
    }
    let result = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
    Ok(LoadedKernel {
        kind,
        host_decompressed: None,
        entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY,
        end: result.kernel_end,
        setup_header: result.setup_header,
    })
}

/// Why a bzImage's payload was not loaded from the host.
#[derive(Debug, thiserror::Error)]
enum HostDecompressError {
    #[error("cannot read the image: {0}")]
    Read(std::io::Error),
    #[error("the image is {0} bytes, more than a bzImage holds")]
    TooLarge(u64),
    #[error(transparent)]
    Payload(#[from] payload::PayloadError),
    #[error("cannot load the decompressed vmlinux: {0}")]
    ElfLoad(linux_loader::loader::Error),
}

/// Reads a bzImage's own setup header (at 0x1f1), as the zero page starts
/// from it.
pub fn bzimage_setup_header(image: &[u8]) -> Option<setup_header> {
    let mut hdr = setup_header::default();
    let size = hdr.as_slice().len();
    hdr.as_mut_slice()
        .copy_from_slice(image.get(0x1f1..0x1f1 + size)?);
    Some(hdr)
}

/// Decompresses a bzImage's payload on the host and loads the ELF vmlinux
/// inside, starting at its ELF entry with the zero page built from the
/// bzImage's setup header.
fn load_host_decompressed(
    mem: &GuestMemoryMmap,
    file: &mut File,
) -> Result<LoadedKernel, HostDecompressError> {
    let started = std::time::Instant::now();
    let size = file.metadata().map_err(HostDecompressError::Read)?.len();
    if size > payload::MAX_DECOMPRESSED as u64 {
        return Err(HostDecompressError::TooLarge(size));
    }
    let mut image = Vec::with_capacity(size as usize);
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut image))
        .map_err(HostDecompressError::Read)?;
    let payload = payload::decompress_payload(&image)?;
    let header =
        bzimage_setup_header(&image).ok_or(payload::PayloadError::ShortHeader(image.len()))?;
    let elapsed = started.elapsed();
    let result = Elf::load(
        mem,
        None,
        &mut Cursor::new(payload.elf.as_slice()),
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(HostDecompressError::ElfLoad)?;
    log::info!(
        "kernel: bzImage payload ({}, {:.1} MiB) decompressed on the host in {} ms",
        payload.format,
        payload.elf.len() as f64 / (1u64 << 20) as f64,
        elapsed.as_millis()
    );
    Ok(LoadedKernel {
        kind: ImageKind::BzImage,
        host_decompressed: Some(payload.format),
        entry: result.kernel_load.0,
        end: result.kernel_end,
        setup_header: Some(header),
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
            host_decompressed: None,
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

    /// A synthetic bzImage in a scratch file, loaded into plain guest memory.
    fn load_synthetic(name: &str, payload: &[u8]) -> (LoadedKernel, GuestMemoryMmap) {
        use crate::boot::payload::tests::bzimage;
        let path = std::env::temp_dir().join(format!("pmemvm-{}-{name}", std::process::id()));
        std::fs::write(&path, bzimage(31, payload)).unwrap();
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 * layout::MIB as usize)])
                .unwrap();
        let kernel = load_kernel(&mem, &path).unwrap();
        std::fs::remove_file(&path).unwrap();
        (kernel, mem)
    }

    #[test]
    fn bzimage_payload_is_decompressed_and_loaded_as_elf() {
        use crate::boot::payload::tests::{gzip, tiny_elf};
        let (kernel, mem) = load_synthetic("gz", &gzip(&tiny_elf()));
        assert_eq!(kernel.kind, ImageKind::BzImage);
        assert_eq!(kernel.host_decompressed, Some(Compression::Gzip));
        // The ELF entry, not the bzImage's 64-bit entry.
        assert_eq!(kernel.entry, 0x100_0000);
        assert_eq!(kernel.end, 0x100_1000);
        assert_eq!(
            mem.read_obj::<[u8; 16]>(GuestAddress(0x100_0000)).unwrap(),
            [0xf4; 16]
        );
        // The zero page starts from the file's own setup header.
        let hdr = kernel.setup_header.unwrap();
        assert_eq!(({ hdr.version }, { hdr.loadflags }), (0x020f, 1));
        let p = zero_page(&kernel, 7, Some((0x300_0000, 99)), &[], None);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.setup_sects }, 31);
        assert_eq!({ p.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.cmdline_size }, 7);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x300_0000, 99)
        );
    }

    #[test]
    fn bzimage_with_unknown_payload_falls_back_to_its_own_decompressor() {
        let (kernel, _mem) = load_synthetic("unknown", b"PK\x03\x04 no kernel compression");
        assert_eq!(kernel.kind, ImageKind::BzImage);
        assert_eq!(kernel.host_decompressed, None);
        // code32_start plus the 64-bit entry offset.
        assert_eq!(kernel.entry, 0x10_0000 + BZIMAGE_64BIT_ENTRY);
        assert_eq!({ kernel.setup_header.unwrap().version }, 0x020f);
    }
}
