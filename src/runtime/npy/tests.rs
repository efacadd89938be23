//! The reader on files written by `ndarray-npy`'s writers (the same format as NumPy's).
use std::fs::File;
use std::path::PathBuf;

use ndarray::{arr2, ArrayD, ShapeBuilder};
use ndarray_npy::{NpzWriter, WriteNpyExt};

use super::*;

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn write_npy<T: ndarray_npy::WritableElement>(
    dir: &Path,
    name: &str,
    array: &ArrayD<T>,
) -> PathBuf {
    let path = dir.join(name);
    array.write_npy(File::create(&path).expect("create")).expect("write npy");
    path
}

#[test]
fn reads_every_supported_element_type() {
    let dir = scratch();
    let ids = arr2(&[[1i64, 2, 3], [4, 5, 6]]).into_dyn();
    assert_eq!(
        read_npy(&write_npy(dir.path(), "a.npy", &ids)).unwrap(),
        NpyArray::I64(ids.clone())
    );
    let narrow = ids.mapv(|v| v as i32);
    assert_eq!(
        read_npy(&write_npy(dir.path(), "b.npy", &narrow)).unwrap().into_i64().unwrap(),
        ids
    );
    let floats = ids.mapv(|v| v as f32 / 2.0);
    assert_eq!(
        read_npy(&write_npy(dir.path(), "c.npy", &floats)).unwrap(),
        NpyArray::F32(floats.clone())
    );
    let doubles = ids.mapv(|v| v as f64 / 3.0);
    assert_eq!(
        read_npy(&write_npy(dir.path(), "d.npy", &doubles)).unwrap().into_f64().unwrap(),
        doubles
    );
}

#[test]
fn fortran_order_comes_back_in_standard_layout() {
    let dir = scratch();
    let mut fortran = ArrayD::<i64>::zeros(ndarray::IxDyn(&[2, 3]).f());
    for ((i, j), v) in
        [((0, 0), 1), ((0, 1), 2), ((0, 2), 3), ((1, 0), 4), ((1, 1), 5), ((1, 2), 6)]
    {
        fortran[[i, j]] = v;
    }
    let array = read_npy(&write_npy(dir.path(), "f.npy", &fortran)).unwrap().into_i64().unwrap();
    assert!(array.is_standard_layout());
    assert_eq!(array, arr2(&[[1i64, 2, 3], [4, 5, 6]]).into_dyn());
}

#[test]
fn unsupported_types_and_broken_files_are_named() {
    let dir = scratch();
    let bytes = write_npy(dir.path(), "u8.npy", &arr2(&[[1u8, 2]]).into_dyn());
    let error = read_npy(&bytes).unwrap_err();
    assert!(matches!(error, NpyError::UnsupportedDtype { .. }), "{error}");
    assert!(error.to_string().contains("u8.npy"), "{error}");

    let ids = write_npy(dir.path(), "ids.npy", &arr2(&[[1i64, 2, 3]]).into_dyn());
    let full = std::fs::read(&ids).unwrap();
    std::fs::write(&ids, &full[..full.len() - 4]).unwrap();
    assert!(matches!(read_npy(&ids).unwrap_err(), NpyError::Invalid { .. }));
    assert!(matches!(read_npy(&dir.path().join("missing.npy")).unwrap_err(), NpyError::Io { .. }));
}

#[test]
fn archives_plain_and_compressed() {
    let dir = scratch();
    let ids = arr2(&[[7i64, 8]]).into_dyn();
    let logits = arr2(&[[0.5f32, -1.0]]).into_dyn();
    for (name, compressed) in [("plain.npz", false), ("compressed.npz", true)] {
        let path = dir.path().join(name);
        let file = File::create(&path).unwrap();
        let mut writer =
            if compressed { NpzWriter::new_compressed(file) } else { NpzWriter::new(file) };
        writer.add_array("input_ids", &ids).unwrap();
        writer.add_array("logits", &logits).unwrap();
        writer.finish().unwrap();

        let npz = Npz::read(&path).unwrap();
        assert_eq!(npz.names().collect::<Vec<_>>(), ["input_ids", "logits"]);
        assert_eq!(npz.array("input_ids").unwrap(), &NpyArray::I64(ids.clone()));
        assert_eq!(npz.get("logits"), Some(&NpyArray::F32(logits.clone())));
        let missing = npz.array("attention_mask").unwrap_err().to_string();
        assert!(
            missing.contains("attention_mask") && missing.contains("input_ids, logits"),
            "{missing}"
        );
    }
}
