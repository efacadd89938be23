//! The entries of a zip archive whose members are stored uncompressed, as `np.savez` writes them.
//!
//! Entries are found through the central directory rather than by walking local headers:
//! numpy writes its local headers with ZIP64 placeholder sizes (0xFFFFFFFF), and only the
//! central directory is sure to carry the real ones. Each entry's CRC-32 is checked so that a
//! truncated or corrupted archive is reported instead of read as garbage.

/// One archive member: its name and its stored bytes, borrowed from the archive.
pub(super) struct StoredEntry<'a> {
    pub name: String,
    pub data: &'a [u8],
}

pub(super) enum ZipError {
    Invalid(String),
    Compressed { entry: String, method: u16 },
}

const END_OF_CENTRAL_DIRECTORY: u32 = 0x0605_4b50;
const ZIP64_END_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_END_OF_CENTRAL_DIRECTORY: u32 = 0x0606_4b50;
const CENTRAL_DIRECTORY_ENTRY: u32 = 0x0201_4b50;
const LOCAL_HEADER: u32 = 0x0403_4b50;
const ZIP64_EXTRA_FIELD: u16 = 0x0001;
const METHOD_STORED: u16 = 0;
const FLAG_ENCRYPTED: u16 = 1;
// Smallest end-of-central-directory record; a trailing archive comment may follow it.
const END_RECORD_LEN: usize = 22;
const MAX_COMMENT_LEN: usize = 0xFFFF;

/// Lists the archive's entries in central-directory order.
pub(super) fn stored_entries(archive: &[u8]) -> Result<Vec<StoredEntry<'_>>, ZipError> {
    let directory = central_directory(archive)?;
    let mut entries = Vec::with_capacity(directory.entry_count);
    let mut position = directory.offset;
    for _ in 0..directory.entry_count {
        let record = directory_record(archive, position)?;
        position = record.next_position;
        entries.push(entry_data(archive, record)?);
    }
    Ok(entries)
}

struct CentralDirectory {
    offset: usize,
    entry_count: usize,
}

struct DirectoryRecord {
    name: String,
    flags: u16,
    method: u16,
    crc32: u32,
    size: usize,
    local_header_offset: usize,
    next_position: usize,
}

fn central_directory(archive: &[u8]) -> Result<CentralDirectory, ZipError> {
    let end = find_end_record(archive)?;
    let entry_count = u16_at(archive, end + 10)?;
    let offset = u32_at(archive, end + 16)?;
    if entry_count == u16::MAX || offset == u32::MAX {
        return zip64_central_directory(archive, end);
    }
    Ok(CentralDirectory { offset: to_usize(u64::from(offset))?, entry_count: usize::from(entry_count) })
}

fn find_end_record(archive: &[u8]) -> Result<usize, ZipError> {
    let last_start = archive.len().checked_sub(END_RECORD_LEN).ok_or_else(|| invalid("it is too short to be a zip archive"))?;
    let first_start = last_start.saturating_sub(MAX_COMMENT_LEN);
    (first_start..=last_start)
        .rev()
        .find(|&at| u32_at(archive, at).ok() == Some(END_OF_CENTRAL_DIRECTORY))
        .ok_or_else(|| invalid("no end-of-central-directory record (not a zip archive, or truncated)"))
}

fn zip64_central_directory(archive: &[u8], end: usize) -> Result<CentralDirectory, ZipError> {
    let locator = end.checked_sub(20).ok_or_else(|| invalid("missing ZIP64 locator"))?;
    expect_signature(archive, locator, ZIP64_END_LOCATOR, "ZIP64 locator")?;
    let record = to_usize(u64_at(archive, locator + 8)?)?;
    expect_signature(archive, record, ZIP64_END_OF_CENTRAL_DIRECTORY, "ZIP64 end record")?;
    Ok(CentralDirectory {
        entry_count: to_usize(u64_at(archive, record + 32)?)?,
        offset: to_usize(u64_at(archive, record + 48)?)?,
    })
}

fn directory_record(archive: &[u8], at: usize) -> Result<DirectoryRecord, ZipError> {
    expect_signature(archive, at, CENTRAL_DIRECTORY_ENTRY, "central directory entry")?;
    let name_len = usize::from(u16_at(archive, at + 28)?);
    let extra_len = usize::from(u16_at(archive, at + 30)?);
    let comment_len = usize::from(u16_at(archive, at + 32)?);
    let name_bytes = bytes_at(archive, at + 46, name_len)?;
    let extra = bytes_at(archive, at + 46 + name_len, extra_len)?;
    let sizes = Zip64Sizes {
        uncompressed: u32_at(archive, at + 24)?,
        compressed: u32_at(archive, at + 20)?,
        local_header_offset: u32_at(archive, at + 42)?,
    };
    let (size, local_header_offset) = sizes.resolve(extra)?;
    Ok(DirectoryRecord {
        name: String::from_utf8_lossy(name_bytes).into_owned(),
        flags: u16_at(archive, at + 8)?,
        method: u16_at(archive, at + 10)?,
        crc32: u32_at(archive, at + 16)?,
        size,
        local_header_offset,
        next_position: at + 46 + name_len + extra_len + comment_len,
    })
}

/// The 32-bit fields of a directory entry; any that reads 0xFFFFFFFF lives in the ZIP64 extra field.
struct Zip64Sizes {
    uncompressed: u32,
    compressed: u32,
    local_header_offset: u32,
}

impl Zip64Sizes {
    /// The stored size and the local header offset, taking ZIP64 values where the 32-bit ones overflow.
    fn resolve(&self, extra: &[u8]) -> Result<(usize, usize), ZipError> {
        let mut wide = zip64_values(extra)?.into_iter();
        let mut widen = |narrow: u32| -> Result<usize, ZipError> {
            match narrow {
                u32::MAX => to_usize(wide.next().ok_or_else(|| invalid("missing ZIP64 size field"))?),
                narrow => to_usize(u64::from(narrow)),
            }
        };
        let uncompressed = widen(self.uncompressed)?;
        let compressed = widen(self.compressed)?;
        let offset = widen(self.local_header_offset)?;
        // Stored entries have equal sizes; a mismatch means the entry is not what it claims.
        if uncompressed != compressed {
            return Err(invalid("an entry's stored and unpacked sizes differ"));
        }
        Ok((compressed, offset))
    }
}

fn zip64_values(extra: &[u8]) -> Result<Vec<u64>, ZipError> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let id = u16_at(extra, at)?;
        let len = usize::from(u16_at(extra, at + 2)?);
        let body = bytes_at(extra, at + 4, len)?;
        if id == ZIP64_EXTRA_FIELD {
            return (0..len / 8).map(|i| u64_at(body, i * 8)).collect();
        }
        at += 4 + len;
    }
    Ok(Vec::new())
}

fn entry_data(archive: &[u8], record: DirectoryRecord) -> Result<StoredEntry<'_>, ZipError> {
    if record.flags & FLAG_ENCRYPTED != 0 {
        return Err(invalid(format!("entry `{}` is encrypted", record.name)));
    }
    if record.method != METHOD_STORED {
        return Err(ZipError::Compressed { entry: record.name, method: record.method });
    }
    let header = record.local_header_offset;
    expect_signature(archive, header, LOCAL_HEADER, "local file header")?;
    let name_len = usize::from(u16_at(archive, header + 26)?);
    let extra_len = usize::from(u16_at(archive, header + 28)?);
    let data = bytes_at(archive, header + 30 + name_len + extra_len, record.size)?;
    if crc32(data) != record.crc32 {
        return Err(invalid(format!("entry `{}` fails its CRC-32 check (corrupted archive)", record.name)));
    }
    Ok(StoredEntry { name: record.name, data })
}

fn expect_signature(bytes: &[u8], at: usize, signature: u32, what: &str) -> Result<(), ZipError> {
    match u32_at(bytes, at) {
        Ok(found) if found == signature => Ok(()),
        _ => Err(invalid(format!("expected a {what} at byte {at}"))),
    }
}

fn bytes_at(bytes: &[u8], at: usize, len: usize) -> Result<&[u8], ZipError> {
    at.checked_add(len)
        .and_then(|end| bytes.get(at..end))
        .ok_or_else(|| invalid(format!("it is truncated (needs bytes {at}..{})", at.saturating_add(len))))
}

fn u16_at(bytes: &[u8], at: usize) -> Result<u16, ZipError> {
    bytes_at(bytes, at, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, ZipError> {
    bytes_at(bytes, at, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64, ZipError> {
    bytes_at(bytes, at, 8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
}

fn to_usize(value: u64) -> Result<usize, ZipError> {
    usize::try_from(value).map_err(|_| invalid("an offset or size does not fit in memory"))
}

fn invalid(reason: impl Into<String>) -> ZipError {
    ZipError::Invalid(reason.into())
}

/// CRC-32 (IEEE 802.3, reflected), as zip uses.
pub(super) fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &byte| CRC32_TABLE[usize::from((crc as u8) ^ byte)] ^ (crc >> 8))
}

const CRC32_TABLE: [u32; 256] = crc32_table();

const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut index = 0;
    while index < 256 {
        let mut crc = index as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            bit += 1;
        }
        table[index] = crc;
        index += 1;
    }
    table
}
