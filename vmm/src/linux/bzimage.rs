//! What a Linux kernel file is, and the ELF `vmlinux` inside a bzImage.
//!
//! A bzImage is a real-mode setup program, a setup header (the boot
//! protocol's `struct setup_header` at offset 0x1f1) and a compressed payload
//! that the kernel's own decompressor would unpack. On hosts whose KVM
//! interprets guest ring 0 that decompressor takes practically forever, so the
//! VMM unpacks the payload itself (`payload_offset`/`payload_length`, boot
//! protocol 2.08+) and boots the ELF `vmlinux` it contains through the 64-bit
//! boot protocol. Debian's kernels compress it with LZ4 (the legacy frame
//! format, `lz4 -l`, followed by the 4-byte uncompressed size the kernel's
//! build appends); other compressors are named in the error.

/// Errors of reading a Linux kernel file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BzImageError {
    /// Too short, no "HdrS", or a header field points outside the file.
    #[error("not a bzImage: {0}")]
    NotBzImage(&'static str),
    /// Boot protocol older than 2.08 has no payload fields.
    #[error("bzImage boot protocol {major}.{minor:02} is too old: 2.08 or newer is needed to find the payload")]
    ProtocolTooOld {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// The payload uses a compressor this VMM does not unpack.
    #[error("the bzImage payload is compressed with {0}, which this VMM does not unpack (it unpacks LZ4, as Debian's kernels use; an uncompressed ELF vmlinux also works)")]
    UnsupportedCompression(&'static str),
    /// The LZ4 stream is damaged.
    #[error("the bzImage's LZ4 payload is damaged: {0}")]
    BadLz4(String),
    /// The unpacked payload is not an ELF file.
    #[error("the bzImage payload did not unpack to an ELF vmlinux")]
    PayloadNotElf,
}

/// Offset of the setup header in the file (and in `boot_params`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
const HDRS_OFFSET: usize = 0x202;
const HDRS: &[u8; 4] = b"HdrS";
const VERSION_OFFSET: usize = 0x206;
const SETUP_SECTS_OFFSET: usize = 0x1f1;
/// The byte at 0x201 is the length of the header after 0x202 (the jump
/// instruction's displacement), so the header ends at 0x202 + that byte.
const HEADER_LENGTH_BYTE: usize = 0x201;
const PAYLOAD_OFFSET_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH_OFFSET: usize = 0x24c;

/// The legacy LZ4 frame's magic ("lz4 -l"), which the kernel's build uses.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// The legacy format's chunks unpack to at most 8 MiB each.
const LZ4_LEGACY_CHUNK: usize = 8 << 20;

/// A bzImage's parts this VMM uses.
#[derive(Debug)]
pub struct BzImage<'a> {
    /// The setup header as in the file: `boot_params` bytes
    /// `0x1f1 .. 0x202 + file[0x201]`.
    pub setup_header: &'a [u8],
    /// The compressed payload.
    pub payload: &'a [u8],
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// True when `image` carries the boot protocol's "HdrS" signature.
pub fn is_bzimage(image: &[u8]) -> bool {
    image.len() >= HDRS_OFFSET + 4 && &image[HDRS_OFFSET..HDRS_OFFSET + 4] == HDRS
}

/// Finds the setup header and the payload of a bzImage.
pub fn parse(image: &[u8]) -> Result<BzImage<'_>, BzImageError> {
    if !is_bzimage(image) {
        return Err(BzImageError::NotBzImage("no \"HdrS\" signature at 0x202"));
    }
    let version = u16::from_le_bytes([image[VERSION_OFFSET], image[VERSION_OFFSET + 1]]);
    if version < 0x0208 {
        return Err(BzImageError::ProtocolTooOld {
            major: (version >> 8) as u8,
            minor: version as u8,
        });
    }
    let header_end = HDRS_OFFSET + usize::from(image[HEADER_LENGTH_BYTE]);
    if header_end < PAYLOAD_LENGTH_OFFSET + 4 || header_end > image.len() {
        return Err(BzImageError::NotBzImage(
            "the setup header's length is inconsistent",
        ));
    }
    // setup_sects 0 means 4, for very old images.
    let setup_sects = match image[SETUP_SECTS_OFFSET] {
        0 => 4,
        n => usize::from(n),
    };
    let protected_mode_start = (setup_sects + 1) * 512;
    let offset = u32_at(image, PAYLOAD_OFFSET_OFFSET) as usize;
    let length = u32_at(image, PAYLOAD_LENGTH_OFFSET) as usize;
    let payload = protected_mode_start
        .checked_add(offset)
        .and_then(|start| Some(start..start.checked_add(length)?))
        .and_then(|range| image.get(range))
        .ok_or(BzImageError::NotBzImage(
            "the payload lies outside the file",
        ))?;
    Ok(BzImage {
        setup_header: &image[SETUP_HEADER_OFFSET..header_end],
        payload,
    })
}

/// The compressor of a payload, by its magic bytes (as the kernel's
/// `decompress_method` tells them apart).
pub fn compression(payload: &[u8]) -> &'static str {
    match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => "LZ4",
        [0x1f, 0x8b, ..] | [0x1f, 0x9e, ..] => "gzip",
        [b'B', b'Z', b'h', ..] => "bzip2",
        [0x5d, 0x00, ..] => "LZMA",
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => "XZ",
        [0x89, b'L', b'Z', b'O', ..] => "LZO",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "Zstandard",
        [0x7f, b'E', b'L', b'F', ..] => "none",
        _ => "an unknown method",
    }
}

/// Unpacks the payload to the ELF `vmlinux`.
pub fn unpack_payload(payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let vmlinux = match compression(payload) {
        "LZ4" => unpack_lz4_legacy(payload)?,
        "none" => payload.to_vec(),
        other => return Err(BzImageError::UnsupportedCompression(other)),
    };
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err(BzImageError::PayloadNotElf);
    }
    Ok(vmlinux)
}

/// The legacy LZ4 format: the magic, then chunks of (u32 compressed size,
/// LZ4 block) each unpacking to at most 8 MiB. The kernel's build appends the
/// uncompressed size as a last u32; a further magic starts a concatenated
/// stream.
fn unpack_lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let bad = |what: String| BzImageError::BadLz4(what);
    let mut out = Vec::new();
    let mut pos = 4;
    let mut trailer = None;
    while pos < payload.len() {
        let Some(word) = payload.get(pos..pos + 4) else {
            return Err(bad(format!(
                "{} stray bytes at the end",
                payload.len() - pos
            )));
        };
        let size = u32::from_le_bytes(word.try_into().expect("4 bytes")) as usize;
        pos += 4;
        if size == LZ4_LEGACY_MAGIC as usize {
            continue;
        }
        if pos == payload.len() {
            // The last word is the size the build appended, not a chunk.
            trailer = Some(size);
            break;
        }
        let chunk = payload.get(pos..pos.saturating_add(size)).ok_or_else(|| {
            bad(format!(
                "a chunk of {size} bytes at {pos:#x} runs past the end"
            ))
        })?;
        let start = out.len();
        out.resize(start + LZ4_LEGACY_CHUNK, 0);
        let n = lz4_flex::block::decompress_into(chunk, &mut out[start..])
            .map_err(|e| bad(format!("chunk at {pos:#x}: {e}")))?;
        out.truncate(start + n);
        pos += size;
    }
    match trailer {
        Some(size) if size != out.len() => Err(bad(format!(
            "unpacked {} bytes, the image says {size}",
            out.len()
        ))),
        _ => Ok(out),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A bzImage-shaped file: one setup sector, protocol 2.15, `payload`
    /// right after the setup code.
    pub(crate) fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut b = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        b[SETUP_SECTS_OFFSET] = setup_sects;
        b[0x1fe] = 0x55;
        b[0x1ff] = 0xaa;
        b[0x200] = 0xeb;
        b[HEADER_LENGTH_BYTE] = 0x6a; // header ends at 0x26c, as in 2.15
        b[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(HDRS);
        b[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        b[PAYLOAD_OFFSET_OFFSET..PAYLOAD_OFFSET_OFFSET + 4].copy_from_slice(&0u32.to_le_bytes());
        b[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    /// `data` in the legacy LZ4 format with the kernel build's size trailer,
    /// cut into chunks of `chunk` bytes.
    pub(crate) fn lz4_legacy(data: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for part in data.chunks(chunk) {
            let block = lz4_flex::block::compress(part);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    fn elf_like(len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        v[..4].copy_from_slice(b"\x7fELF");
        v
    }

    #[test]
    fn finds_header_and_payload() {
        let file = fake_bzimage(b"\x02\x21\x4c\x18rest");
        let bz = parse(&file).unwrap();
        assert_eq!(bz.setup_header.len(), 0x26c - 0x1f1);
        assert_eq!(bz.payload, b"\x02\x21\x4c\x18rest");
        assert_eq!(compression(bz.payload), "LZ4");
    }

    #[test]
    fn unpacks_multi_chunk_lz4_and_checks_the_trailer() {
        let data = elf_like(300_000);
        let packed = lz4_legacy(&data, 100_000);
        let file = fake_bzimage(&packed);
        let bz = parse(&file).unwrap();
        assert_eq!(unpack_payload(bz.payload).unwrap(), data);

        // A wrong trailer is caught.
        let mut bad = packed.clone();
        let n = bad.len();
        bad[n - 4..].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(unpack_payload(&bad), Err(BzImageError::BadLz4(_))));
        // A chunk cut short is caught.
        let cut = &packed[..packed.len() / 2];
        assert!(matches!(unpack_payload(cut), Err(BzImageError::BadLz4(_))));
    }

    #[test]
    fn names_other_compressors_and_rejects_non_bzimages() {
        let gz = fake_bzimage(&[0x1f, 0x8b, 8, 0, 0, 0]);
        let bz = parse(&gz).unwrap();
        assert_eq!(
            unpack_payload(bz.payload),
            Err(BzImageError::UnsupportedCompression("gzip"))
        );
        let zst = [0x28, 0xb5, 0x2f, 0xfd, 0];
        assert_eq!(
            unpack_payload(&zst),
            Err(BzImageError::UnsupportedCompression("Zstandard"))
        );
        assert!(matches!(
            parse(b"\x7fELF...."),
            Err(BzImageError::NotBzImage(_))
        ));
        let mut old = fake_bzimage(b"xx");
        old[VERSION_OFFSET] = 0x04;
        old[VERSION_OFFSET + 1] = 0x02;
        assert!(matches!(
            parse(&old),
            Err(BzImageError::ProtocolTooOld { .. })
        ));
        // Payload length beyond the file.
        let mut long = fake_bzimage(b"xx");
        long[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4]
            .copy_from_slice(&0x1000_0000u32.to_le_bytes());
        assert!(matches!(parse(&long), Err(BzImageError::NotBzImage(_))));
        // An LZ4 payload that does not unpack to an ELF.
        let not_elf = lz4_legacy(&[1, 2, 3, 4, 5, 6], 16);
        assert_eq!(unpack_payload(&not_elf), Err(BzImageError::PayloadNotElf));
    }
}
