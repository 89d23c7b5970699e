//! Reading and writing 2-D f32 NumPy `.npy` files for `moectl forward`.

use std::path::Path;

use anyhow::{Context, bail};
use npyz::WriterBuilder;

/// A 2-D f32 array, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub columns: usize,
    pub values: Vec<f32>,
}

/// Reads a 2-D `float32` `.npy` file (C order).
pub fn read_matrix(path: &Path) -> anyhow::Result<Matrix> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{} is not a .npy file", path.display()))?;
    if npy.order() != npyz::Order::C {
        bail!(
            "{} is in Fortran order; save it in C order (np.ascontiguousarray)",
            path.display()
        );
    }
    let shape = npy.shape().to_vec();
    let [rows, columns] = shape[..] else {
        bail!(
            "{} has shape {shape:?}; expected [tokens, hidden]",
            path.display()
        );
    };
    let dtype = npy.dtype();
    let values: Vec<f32> = npy.into_vec().with_context(|| {
        format!(
            "{} holds {dtype:?}; expected float32 ('<f4')",
            path.display()
        )
    })?;
    Ok(Matrix {
        rows: rows as usize,
        columns: columns as usize,
        values,
    })
}

/// Writes a 2-D `float32` `.npy` file.
pub fn write_matrix(path: &Path, matrix: &Matrix) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    {
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[matrix.rows as u64, matrix.columns as u64])
            .writer(&mut bytes)
            .begin_nd()?;
        writer.extend(matrix.values.iter().copied())?;
        writer.finish()?;
    }
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let matrix = Matrix {
            rows: 2,
            columns: 3,
            values: vec![1.0, -2.5, 3.0, 4.0, 5.0, f32::MIN_POSITIVE],
        };
        write_matrix(&path, &matrix).unwrap();
        assert_eq!(read_matrix(&path).unwrap(), matrix);
    }

    #[test]
    fn wrong_rank_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let mut bytes = Vec::new();
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[4])
            .writer(&mut bytes)
            .begin_nd()
            .unwrap();
        writer.extend([1f32, 2.0, 3.0, 4.0]).unwrap();
        writer.finish().unwrap();
        std::fs::write(&path, bytes).unwrap();
        let error = read_matrix(&path).unwrap_err().to_string();
        assert!(error.contains("expected [tokens, hidden]"), "{error}");
    }
}
