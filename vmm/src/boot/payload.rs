//! A bzImage's compressed payload, found from its setup header and
//! decompressed on the host.
//!
//! A bzImage carries the kernel's ELF vmlinux compressed behind a small
//! decompressor. Run in the guest, that decompressor is slow wherever guest
//! code is slow (minutes on nested shadow-paging KVM); decompressed here, the
//! vmlinux inside is loaded like any other ELF kernel. Everything is plain
//! functions on byte slices, so tests drive it without guest memory.
//!
//! Layout (Documentation/arch/x86/boot.rst, boot protocol 2.08 and later):
//! the protected-mode kernel starts `(setup_sects + 1) * 512` bytes into the
//! file (`setup_sects` 0 means 4), and the payload is `payload_length` bytes
//! at `payload_offset` from there. The build appends the uncompressed size,
//! 4 bytes little-endian, to every format (gzip's own trailer ends the same
//! way), so the payload's last 4 bytes say how big the vmlinux is.

use std::io::Read;
use std::ops::Range;

const SETUP_SECTS: usize = 0x1f1;
const HDR_MAGIC: Range<usize> = 0x202..0x206;
const VERSION: usize = 0x206;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
/// Boot protocol that added `payload_offset` and `payload_length`.
const MIN_VERSION: u16 = 0x0208;

/// The largest vmlinux decompressed on the host, so that a hostile image
/// cannot make pmemvm allocate without bound.
pub const MAX_DECOMPRESSED: usize = 512 << 20;

/// The most memory the xz and lzma decoders may take for their dictionary
/// (a header may ask for up to 4 GiB); kernels use 32 or 64 MiB.
const MEM_LIMIT_KIB: u32 = (MAX_DECOMPRESSED >> 10) as u32;

/// The compressions a kernel build may choose (CONFIG_KERNEL_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    Lzma,
    Bzip2,
    Lz4,
    Lzo,
}

impl Compression {
    /// Names a payload's compression by its first bytes.
    pub fn from_magic(data: &[u8]) -> Option<Self> {
        const MAGICS: &[(&[u8], Compression)] = &[
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], Compression::Xz),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (b"BZh", Compression::Bzip2),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (&[0x89, 0x4c, 0x5a, 0x4f], Compression::Lzo),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| data.starts_with(magic))
            .map(|&(_, c)| c)
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lzma => "lzma",
            Compression::Bzip2 => "bzip2",
            Compression::Lz4 => "lz4",
            Compression::Lzo => "lzo",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a payload was not decompressed on the host.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("the image is {0} bytes, too short for a setup header")]
    ShortHeader(usize),
    #[error("the image has no HdrS setup header")]
    NoHeader,
    #[error("boot protocol {0:#06x} predates payload_offset (2.08)")]
    OldProtocol(u16),
    #[error("payload_offset {offset:#x} and payload_length {length:#x} (from {start:#x}) run past the end of the {size}-byte image")]
    OutOfBounds {
        start: usize,
        offset: u32,
        length: u32,
        size: usize,
    },
    #[error("payload_length {0} is too short for a compressed kernel")]
    ShortPayload(u32),
    #[error("unknown compression (the payload starts {0:02x?})")]
    UnknownCompression(Vec<u8>),
    #[error("{0} payloads are not decompressed on the host")]
    Unsupported(Compression),
    #[error("the payload says it holds {0} bytes, over the {limit} MiB limit", limit = MAX_DECOMPRESSED >> 20)]
    TooBig(u64),
    #[error("{format} decompression failed: {detail}")]
    Decompress { format: Compression, detail: String },
    #[error("{format} payload decompressed to {got} bytes where its trailer says {want}")]
    SizeMismatch {
        format: Compression,
        got: usize,
        want: usize,
    },
    #[error("the decompressed {0} payload is not an ELF file")]
    NotElf(Compression),
}

/// A decompressed payload: the kernel's ELF vmlinux.
#[derive(Debug)]
pub struct Payload {
    pub format: Compression,
    pub elf: Vec<u8>,
}

fn le16(image: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(image.get(at..at + 2)?.try_into().ok()?))
}

fn le32(image: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?))
}

/// Where the compressed payload lies in a bzImage, checked against its size.
pub fn payload_range(image: &[u8]) -> Result<Range<usize>, PayloadError> {
    let (Some(version), Some(offset), Some(length), Some(&sects)) = (
        le16(image, VERSION),
        le32(image, PAYLOAD_OFFSET),
        le32(image, PAYLOAD_LENGTH),
        image.get(SETUP_SECTS),
    ) else {
        return Err(PayloadError::ShortHeader(image.len()));
    };
    if image.get(HDR_MAGIC) != Some(b"HdrS".as_slice()) {
        return Err(PayloadError::NoHeader);
    }
    if version < MIN_VERSION {
        return Err(PayloadError::OldProtocol(version));
    }
    let sects = if sects == 0 { 4 } else { usize::from(sects) };
    let start = (sects + 1) * 512;
    let out_of_bounds = || PayloadError::OutOfBounds {
        start,
        offset,
        length,
        size: image.len(),
    };
    let begin = start
        .checked_add(offset as usize)
        .ok_or_else(out_of_bounds)?;
    let end = begin
        .checked_add(length as usize)
        .ok_or_else(out_of_bounds)?;
    if end > image.len() {
        return Err(out_of_bounds());
    }
    // At least a magic number and the 4-byte size trailer.
    if length < 8 {
        return Err(PayloadError::ShortPayload(length));
    }
    Ok(begin..end)
}

/// Finds, names and decompresses a bzImage's payload, and checks that it is
/// an ELF file.
pub fn decompress_payload(image: &[u8]) -> Result<Payload, PayloadError> {
    let data = &image[payload_range(image)?];
    let format = Compression::from_magic(data)
        .ok_or_else(|| PayloadError::UnknownCompression(data.iter().take(6).copied().collect()))?;
    let elf = decompress(format, data)?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(PayloadError::NotElf(format));
    }
    Ok(Payload { format, elf })
}

/// Decompresses a whole payload, trailer included, into exactly as many
/// bytes as the trailer says, at most [`MAX_DECOMPRESSED`].
pub fn decompress(format: Compression, data: &[u8]) -> Result<Vec<u8>, PayloadError> {
    if format == Compression::Lzo {
        return Err(PayloadError::Unsupported(format));
    }
    let split = data.len().saturating_sub(4);
    let (body, trailer) = data.split_at(split);
    let want = u64::from(le32(trailer, 0).unwrap_or(0));
    if want > MAX_DECOMPRESSED as u64 {
        return Err(PayloadError::TooBig(want));
    }
    let want = want as usize;
    let failed = |e: &dyn std::fmt::Display| PayloadError::Decompress {
        format,
        detail: e.to_string(),
    };
    // gzip's trailer is its own ISIZE field; the others' is appended.
    let mut reader: Box<dyn Read + '_> = match format {
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(data)),
        Compression::Xz => Box::new(lzma_rust2::XzReader::new_mem_limit(
            body,
            false,
            MEM_LIMIT_KIB,
        )),
        Compression::Lzma => Box::new(
            lzma_rust2::LzmaReader::new_mem_limit(body, MEM_LIMIT_KIB, None)
                .map_err(|e| failed(&e))?,
        ),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new_with_max_window_size(
                body,
                MAX_DECOMPRESSED as u64,
            )
            .map_err(|e| failed(&e))?,
        ),
        Compression::Bzip2 => Box::new(bzip2::read::BzDecoder::new(body)),
        // The kernel's is the legacy frame (`lz4 -l`), which lz4_flex reads.
        Compression::Lz4 => Box::new(lz4_flex::frame::FrameDecoder::new(body)),
        Compression::Lzo => return Err(PayloadError::Unsupported(format)),
    };
    let mut out = Vec::with_capacity(want);
    // One byte more than the trailer allows shows a stream that runs on.
    (&mut reader)
        .take(want as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| failed(&e))?;
    if out.len() != want {
        return Err(PayloadError::SizeMismatch {
            format,
            got: out.len(),
            want,
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal ELF64 x86-64 vmlinux: the header, one PT_LOAD of 16 bytes
    /// at 16 MiB, and its contents.
    pub(crate) fn tiny_elf() -> Vec<u8> {
        const LOAD: u64 = 0x100_0000;
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // ELFCLASS64
        e[5] = 1; // little-endian
        e[6] = 1; // EV_CURRENT
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&LOAD.to_le_bytes()); // e_entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&(LOAD + 0xffff_ffff_8000_0000).to_le_bytes());
        ph[24..32].copy_from_slice(&LOAD.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&0x1000u64.to_le_bytes()); // p_memsz
        e.extend_from_slice(&ph);
        e.extend_from_slice(&[0xf4; 16]); // hlt
        e
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    /// xz as the kernel build makes it: CRC32 check, x86 BCJ filter, and
    /// the size appended.
    fn xz(data: &[u8]) -> Vec<u8> {
        let mut opts = lzma_rust2::XzOptions::with_preset(6);
        opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
        opts.filters = vec![lzma_rust2::FilterConfig::new_bcj_x86(0)];
        let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
        w.write_all(data).unwrap();
        let mut out = w.finish().unwrap();
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    /// .lzma as `lzma -9` writes it from a pipe: size unknown in the
    /// header, an end marker, then the appended size.
    fn lzma(data: &[u8]) -> Vec<u8> {
        let opts = lzma_rust2::LzmaOptions::with_preset(9);
        let mut w = lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &opts, None).unwrap();
        w.write_all(data).unwrap();
        let mut out = w.finish().unwrap();
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    fn bzip2(data: &[u8]) -> Vec<u8> {
        let mut w = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        w.write_all(data).unwrap();
        let mut out = w.finish().unwrap();
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    /// A legacy LZ4 frame as `lz4 -l` writes it: the magic, then blocks
    /// of at most 8 MiB, each after its compressed size; then the appended
    /// size.
    fn lz4_legacy(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x02, 0x21, 0x4c, 0x18];
        for chunk in data.chunks(8 << 20) {
            let block = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        let mut out =
            ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    /// A bzImage around `payload`: a boot sector and setup header (protocol
    /// 2.15, `setup_sects` sectors of setup), a little protected-mode code,
    /// then the payload at offset 0x100 from the protected-mode start.
    pub(crate) fn bzimage(setup_sects: u8, payload: &[u8]) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            setup_sects as usize
        };
        let start = (sects + 1) * 512;
        let mut img = vec![0u8; start + 0x100];
        img[SETUP_SECTS] = setup_sects;
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[HDR_MAGIC].copy_from_slice(b"HdrS");
        img[VERSION..VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&0x100u32.to_le_bytes());
        img[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0u8; 64]); // what follows the payload
        img
    }

    #[test]
    fn names_compressions_by_magic() {
        for (bytes, want) in [
            (&b"\x1f\x8b\x08"[..], Some(Compression::Gzip)),
            (b"\xfd7zXZ\x00\x00", Some(Compression::Xz)),
            (b"\x28\xb5\x2f\xfd", Some(Compression::Zstd)),
            (b"\x5d\x00\x00\x80", Some(Compression::Lzma)),
            (b"BZh9", Some(Compression::Bzip2)),
            (b"\x02\x21\x4c\x18", Some(Compression::Lz4)),
            (b"\x89LZO", Some(Compression::Lzo)),
            (b"\xfd7zXZ", None),
            (b"\x7fELF", None),
            (b"", None),
        ] {
            assert_eq!(Compression::from_magic(bytes), want, "{bytes:02x?}");
        }
    }

    #[test]
    fn decompresses_gzip_xz_zstd_lzma_bzip2_and_lz4_payloads() {
        let elf = tiny_elf();
        for (packed, format, sects) in [
            (gzip(&elf), Compression::Gzip, 31),
            (xz(&elf), Compression::Xz, 0),
            (zstd(&elf), Compression::Zstd, 4),
            (lzma(&elf), Compression::Lzma, 31),
            (bzip2(&elf), Compression::Bzip2, 31),
            (lz4_legacy(&elf), Compression::Lz4, 31),
        ] {
            let img = bzimage(sects, &packed);
            let p = decompress_payload(&img).unwrap_or_else(|e| panic!("{format}: {e}"));
            assert_eq!(p.format, format);
            assert_eq!(p.elf, elf, "{format}");
        }
    }

    /// Kernels are bigger than one 8 MiB legacy LZ4 block or one xz block.
    #[test]
    fn decompresses_multi_block_payloads() {
        let mut big = tiny_elf();
        let mut x = 1u32;
        big.extend((0..(9 << 20)).map(|i| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            if i % 3 == 0 {
                (x >> 24) as u8
            } else {
                b'k'
            }
        }));
        for (packed, format) in [
            (lz4_legacy(&big), Compression::Lz4),
            (zstd(&big), Compression::Zstd),
        ] {
            let p = decompress_payload(&bzimage(31, &packed)).unwrap();
            assert_eq!(p.format, format);
            assert!(p.elf == big, "{format}");
        }
    }

    #[test]
    fn bad_payloads_are_reasons_not_panics() {
        let elf = tiny_elf();
        let good = bzimage(31, &gzip(&elf));
        let len_at = PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4;
        let real_len = u32::from_le_bytes(good[len_at.clone()].try_into().unwrap());

        // The file ends inside the payload.
        let start = 32 * 512 + 0x100;
        let cut = &good[..start + real_len as usize / 2];
        assert!(matches!(
            decompress_payload(cut),
            Err(PayloadError::OutOfBounds { .. })
        ));
        // payload_length too long (past the file) and too short (the stream
        // and its size trailer are cut).
        for len in [u32::MAX, real_len + 1000, real_len - 7, 3] {
            let mut img = good.clone();
            img[len_at.clone()].copy_from_slice(&len.to_le_bytes());
            let err = decompress_payload(&img).expect_err("a wrong payload_length");
            assert!(
                matches!(
                    err,
                    PayloadError::OutOfBounds { .. }
                        | PayloadError::ShortPayload(_)
                        | PayloadError::Decompress { .. }
                        | PayloadError::SizeMismatch { .. }
                        | PayloadError::TooBig(_)
                ),
                "{len}: {err}"
            );
        }
        // payload_offset past the end, and huge.
        for off in [0x10_0000u32, u32::MAX] {
            let mut img = good.clone();
            img[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&off.to_le_bytes());
            assert!(matches!(
                decompress_payload(&img),
                Err(PayloadError::OutOfBounds { .. })
            ));
        }
        // A truncated stream inside a consistent header.
        let packed = xz(&elf);
        let cut = bzimage(31, &packed[..packed.len() / 2]);
        assert!(decompress_payload(&cut).is_err());
        // Too short for a header, no header, an old protocol.
        assert!(matches!(
            decompress_payload(&good[..0x240]),
            Err(PayloadError::ShortHeader(_))
        ));
        let mut img = good.clone();
        img[HDR_MAGIC].copy_from_slice(b"HdrX");
        assert!(matches!(
            decompress_payload(&img),
            Err(PayloadError::NoHeader)
        ));
        let mut img = good.clone();
        img[VERSION..VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(matches!(
            decompress_payload(&img),
            Err(PayloadError::OldProtocol(0x0206))
        ));
    }

    #[test]
    fn unknown_unsupported_and_non_elf_payloads_fall_back() {
        let img = bzimage(31, b"PK\x03\x04 not a kernel compression");
        assert!(matches!(
            decompress_payload(&img),
            Err(PayloadError::UnknownCompression(_))
        ));
        let img = bzimage(31, b"\x89LZO lzo payload...");
        assert!(matches!(
            decompress_payload(&img),
            Err(PayloadError::Unsupported(Compression::Lzo))
        ));
        let img = bzimage(31, &gzip(b"#!/bin/sh\necho not an ELF\n"));
        assert!(matches!(
            decompress_payload(&img),
            Err(PayloadError::NotElf(Compression::Gzip))
        ));
        // An lzma header asking for a 4 GiB dictionary.
        let mut packed = lzma(&tiny_elf());
        packed[1..5].copy_from_slice(&0xffff_0000u32.to_le_bytes());
        assert!(matches!(
            decompress_payload(&bzimage(31, &packed)),
            Err(PayloadError::Decompress { .. })
        ));
        // A trailer claiming more than the limit is refused before decoding.
        let mut packed = zstd(&tiny_elf());
        let n = packed.len();
        packed[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decompress_payload(&bzimage(31, &packed)),
            Err(PayloadError::TooBig(_))
        ));
    }

    /// Decompresses the kernels named in PMEMVM_BZIMAGES (colon-separated),
    /// e.g. the test guest's bzImage and Debian's vmlinuz.
    #[test]
    #[ignore = "needs real kernels: PMEMVM_BZIMAGES=a:b"]
    fn decompresses_real_kernels() {
        let paths = std::env::var("PMEMVM_BZIMAGES").expect("PMEMVM_BZIMAGES");
        for path in paths.split(':') {
            let img = std::fs::read(path).unwrap();
            let t = std::time::Instant::now();
            let p = decompress_payload(&img).unwrap_or_else(|e| panic!("{path}: {e}"));
            eprintln!(
                "{path}: {} payload, {} bytes -> {} bytes ELF in {:.1?}",
                p.format,
                payload_range(&img).unwrap().len(),
                p.elf.len(),
                t.elapsed()
            );
        }
    }
}
