//! Unit tests of the `.npy` / `.npz` reader on hand-built files.

use super::stored_zip::crc32;
use super::*;

/// A version 1.0 `.npy` file with the given header dict and data.
fn npy_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = NPY_MAGIC.to_vec();
    bytes.extend([1, 0]);
    let header = format!("{header}\n");
    bytes.extend(u16::try_from(header.len()).unwrap_or(u16::MAX).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    bytes
}

fn le_bytes_i64(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A zip archive of the given entries, each written with the given method but never compressed:
/// enough to test what the reader accepts and refuses.
fn zip_bytes(entries: &[(&str, &[u8], u16)]) -> Vec<u8> {
    let mut archive = Vec::new();
    let mut directory = Vec::new();
    for &(name, data, method) in entries {
        let offset = archive.len() as u32;
        let (crc, size, name_len) = (crc32(data), data.len() as u32, name.len() as u16);
        archive.extend(0x0403_4b50u32.to_le_bytes());
        archive.extend([20, 0, 0, 0]);
        archive.extend(method.to_le_bytes());
        archive.extend([0; 4]);
        archive.extend(crc.to_le_bytes());
        archive.extend(size.to_le_bytes());
        archive.extend(size.to_le_bytes());
        archive.extend(name_len.to_le_bytes());
        archive.extend(0u16.to_le_bytes());
        archive.extend(name.as_bytes());
        archive.extend(data);

        directory.extend(0x0201_4b50u32.to_le_bytes());
        directory.extend([20, 0, 20, 0, 0, 0]);
        directory.extend(method.to_le_bytes());
        directory.extend([0; 4]);
        directory.extend(crc.to_le_bytes());
        directory.extend(size.to_le_bytes());
        directory.extend(size.to_le_bytes());
        directory.extend(name_len.to_le_bytes());
        directory.extend([0; 12]);
        directory.extend(offset.to_le_bytes());
        directory.extend(name.as_bytes());
    }
    let directory_offset = archive.len() as u32;
    let count = entries.len() as u16;
    archive.extend(&directory);
    archive.extend(0x0605_4b50u32.to_le_bytes());
    archive.extend([0; 4]);
    archive.extend(count.to_le_bytes());
    archive.extend(count.to_le_bytes());
    archive.extend((directory.len() as u32).to_le_bytes());
    archive.extend(directory_offset.to_le_bytes());
    archive.extend([0; 2]);
    archive
}

#[test]
fn reads_c_order_int64() {
    let bytes = npy_bytes("{'descr': '<i8', 'fortran_order': False, 'shape': (2, 3), }", &le_bytes_i64(&[1, 2, 3, 4, 5, 6]));
    let array = parse_npy(&bytes, "t.npy").and_then(NpyArray::into_i64);
    let expected = ndarray::arr2(&[[1i64, 2, 3], [4, 5, 6]]).into_dyn();
    assert_eq!(array.ok(), Some(expected));
}

#[test]
fn reads_fortran_order_into_c_layout() {
    // Column-major [[1, 2, 3], [4, 5, 6]] is stored as 1 4 2 5 3 6.
    let data: Vec<u8> = [1f32, 4., 2., 5., 3., 6.].iter().flat_map(|v| v.to_le_bytes()).collect();
    let bytes = npy_bytes("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", &data);
    let array = parse_npy(&bytes, "t.npy").and_then(NpyArray::into_f32);
    let expected = ndarray::arr2(&[[1f32, 2., 3.], [4., 5., 6.]]).into_dyn();
    assert_eq!(array.as_ref().ok(), Some(&expected));
    assert!(array.is_ok_and(|a| a.is_standard_layout()));
}

#[test]
fn reads_scalars_and_one_element_tuples() {
    let scalar = npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (), }", &2.5f64.to_le_bytes());
    assert_eq!(parse_npy(&scalar, "s.npy").ok().map(|a| a.shape().to_vec()), Some(vec![]));
    let vector = npy_bytes("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }", &[7, 0, 0, 0, 8, 0, 0, 0]);
    let widened = parse_npy(&vector, "v.npy").and_then(NpyArray::into_i64);
    assert_eq!(widened.ok(), Some(ndarray::arr1(&[7i64, 8]).into_dyn()));
}

#[test]
fn refuses_big_endian_and_unknown_dtypes() {
    for descr in [">i8", "<f2", "|b1", "<u8"] {
        let bytes = npy_bytes(&format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (0,), }}"), &[]);
        let error = parse_npy(&bytes, "d.npy").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains(descr) && error.contains("supported are"), "{descr}: {error}");
    }
}

#[test]
fn refuses_truncated_data() {
    let bytes = npy_bytes("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", &le_bytes_i64(&[1, 2]));
    let error = parse_npy(&bytes, "short.npy").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("short.npy") && error.contains("needs 24 data bytes, found 16"), "{error}");
}

#[test]
fn refuses_files_that_are_not_npy() {
    let error = parse_npy(b"hello", "x.npy").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("magic"), "{error}");
}

#[test]
fn reads_stored_npz_entries_by_name() {
    let ids = npy_bytes("{'descr': '<i8', 'fortran_order': False, 'shape': (1, 2), }", &le_bytes_i64(&[5, 6]));
    let archive = zip_bytes(&[("ids.npy", &ids, 0)]);
    let npz = Npz::from_bytes(&archive, "a.npz");
    let ids = npz.as_ref().ok().and_then(|npz| npz.get("ids")).cloned().map(NpyArray::into_i64);
    assert_eq!(ids.and_then(Result::ok), Some(ndarray::arr2(&[[5i64, 6]]).into_dyn()));
    let missing = npz.ok().map(|npz| npz.array("logits").err().map(|e| e.to_string()));
    assert_eq!(missing.flatten().as_deref(), Some("a.npz has no array named `logits`; it has: ids"));
}

#[test]
fn refuses_compressed_npz_entries() {
    let ids = npy_bytes("{'descr': '<i8', 'fortran_order': False, 'shape': (0,), }", &[]);
    let archive = zip_bytes(&[("ids.npy", &ids, 8)]);
    let error = Npz::from_bytes(&archive, "c.npz").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("np.savez_compressed") && error.contains("ids.npy"), "{error}");
}

#[test]
fn detects_corrupted_npz_entries() {
    let ids = npy_bytes("{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }", &le_bytes_i64(&[1]));
    let mut archive = zip_bytes(&[("ids.npy", &ids, 0)]);
    let last_data_byte = 30 + "ids.npy".len() + ids.len() - 1;
    archive[last_data_byte] ^= 0xFF;
    let error = Npz::from_bytes(&archive, "bad.npz").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("CRC-32"), "{error}");
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}
