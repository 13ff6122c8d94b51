//! Safe, bounds-checked matrix views over `matrixmultiply`'s pointer-and-stride sgemm.

/// A read-only strided f32 matrix.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A writable strided f32 matrix.
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

fn last_index(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return None;
    }
    Some((rows - 1) * rs + (cols - 1) * cs)
}

impl<'a> MatRef<'a> {
    /// Row-major `rows × cols` with row stride `ld`. Panics if the view exceeds `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        Self::strided(data, rows, cols, ld, 1)
    }

    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if let Some(last) = last_index(rows, cols, rs, cs) {
            assert!(
                last < data.len(),
                "matrix view {rows}x{cols} (strides {rs},{cs}) exceeds a buffer of {}",
                data.len()
            );
        }
        MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

impl<'a> MatMut<'a> {
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, ld: usize) -> Self {
        if let Some(last) = last_index(rows, cols, ld, 1) {
            assert!(
                last < data.len(),
                "matrix view {rows}x{cols} (row stride {ld}) exceeds a buffer of {}",
                data.len()
            );
        }
        MatMut {
            data,
            rows,
            cols,
            rs: ld,
            cs: 1,
        }
    }
}

/// `c = alpha · a · b + beta · c`. Panics on mismatched shapes (callers derive them from checked dims).
pub fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) {
    assert!(
        a.cols == b.rows && a.rows == c.rows && b.cols == c.cols,
        "gemm shapes {}x{} · {}x{} -> {}x{}",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
    if c.rows == 0 || c.cols == 0 {
        return;
    }
    if a.cols == 0 {
        // matrixmultiply handles k = 0 by scaling c; keep the behaviour explicit.
        for i in 0..c.rows {
            for j in 0..c.cols {
                let x = &mut c.data[i * c.rs + j * c.cs];
                *x = if beta == 0.0 { 0.0 } else { beta * *x };
            }
        }
        return;
    }
    // SAFETY: every view was bounds-checked at construction (last element < len) and shapes agree,
    // so sgemm reads a[..], b[..] and writes c[..] only inside their slices; `c` is a unique borrow
    // and cannot alias `a` or `b` (shared borrows).
    unsafe {
        matrixmultiply::sgemm(
            c.rows,
            a.cols,
            c.cols,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.data.as_mut_ptr(),
            c.rs as isize,
            c.cs as isize,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_a_naive_product_with_transposes() {
        let a: Vec<f32> = (0..6).map(|x| x as f32).collect(); // 2x3
        let b: Vec<f32> = (0..12).map(|x| (x as f32) * 0.5).collect(); // 4x3, used transposed
        let mut c = vec![1.0f32; 8]; // 2x4
        gemm(
            2.0,
            MatRef::new(&a, 2, 3, 3),
            MatRef::new(&b, 4, 3, 3).t(),
            1.0,
            MatMut::new(&mut c, 2, 4, 4),
        );
        for i in 0..2 {
            for j in 0..4 {
                let want: f32 =
                    1.0 + 2.0 * (0..3).map(|k| a[i * 3 + k] * b[j * 3 + k]).sum::<f32>();
                assert_eq!(c[i * 4 + j], want);
            }
        }
    }
}
