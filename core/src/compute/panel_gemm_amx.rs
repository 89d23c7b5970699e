//! bf16 products on AMX (Intel Xeons since Sapphire Rapids): one
//! `tdpbf16ps` multiplies a tile of 16 rows × 32 depths of bf16
//! activations by a tile of 32 depths × 16 columns of bf16 weights into
//! 16 × 16 f32 sums, 8192 multiply-adds, where `vdpbf16ps` does 512.
//!
//! The weights' panels are AMX's layout already: a panel's depth word is
//! a row of bf16 pairs, column after column, so a weight tile is 16 depth
//! words × 16 columns of a panel, read with the panel's width as stride.
//! The activations are packed row by row ([`PackedRows::pack_for_amx`]),
//! rows padded to 32 and depth to whole tiles with zeros.
//!
//! AMX rounds its sums its own way: on a Xeon with AMX-BF16, neither a
//! rounding per product in either order of a pair, nor one per pair or
//! per instruction, matched its bits (61-66% of 102,400 sums each, the
//! rest off in the last bits). So bf16 products on AMX are not the bits
//! of the other kernels; they are still the same bits for a row whatever
//! its batch, its threads or its panel width, since each output takes
//! the same depth tiles in the same order. `MOEMESH_NO_AMX=1` keeps a
//! host on `vdpbf16ps`, the bits of every other host.

use std::arch::asm;
use std::sync::OnceLock;

use super::{PANEL, PackedRows, Product, Words, panel_bounds};

/// Rows of a tile of activations or sums.
const TILE_ROWS: usize = 16;
/// Depth words (bf16 pairs) of a tile of activations: 64 bytes a row.
pub(super) const TILE_WORDS: usize = 16;
/// Columns of a tile of weights or sums: 16 words or f32, 64 bytes.
const TILE_COLUMNS: usize = 16;
/// Rows of activations a block computes: two tiles, each reused against
/// two tiles of weights (four tiles of sums, two of activations and two
/// of weights: AMX's eight).
pub(super) const BLOCK_ROWS: usize = 2 * TILE_ROWS;

/// Whether bf16 products run on AMX here: the CPU has AMX-BF16, Linux
/// grants this process its tile state (`arch_prctl`), and
/// `MOEMESH_NO_AMX` is not set.
pub(super) fn available() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        amx_bf16 && amx_tile && std::env::var_os("MOEMESH_NO_AMX").is_none() && request_tile_data()
    })
}

/// Asks Linux for AMX's tile data state, which it gives a process only
/// on request (`ARCH_REQ_XCOMP_PERM`); for every thread of the process.
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
    const XFEATURE_XTILEDATA: u64 = 18;
    let result: i64;
    // SAFETY: arch_prctl reads its two integer arguments and changes
    // nothing but the process's permitted state components.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => result,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    result == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// Palette 1 with all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const FULL_TILES: TileConfig = {
    let mut bytes = [0u8; 64];
    bytes[0] = 1;
    let mut tile = 0;
    while tile < 8 {
        bytes[16 + 2 * tile] = (TILE_COLUMNS * 4) as u8;
        bytes[48 + tile] = TILE_ROWS as u8;
        tile += 1;
    }
    TileConfig(bytes)
};

impl PackedRows {
    /// Lays out `lhs [rows, k]` as bf16 words row after row for AMX:
    /// `[rows padded to BLOCK_ROWS][depth words padded to TILE_WORDS]`.
    pub(super) fn pack_for_amx(&mut self, lhs: &[f32], rows: usize, k: usize) {
        let kind = Words::Bf16Pairs;
        let stride = kind.depth_words(k).next_multiple_of(TILE_WORDS);
        self.row_major.clear();
        self.row_major
            .resize_zeroed(rows.next_multiple_of(BLOCK_ROWS) * stride);
        for (row, words) in self
            .row_major
            .chunks_exact_mut(stride)
            .take(rows)
            .enumerate()
        {
            kind.row_words(
                &lhs[row * k..(row + 1) * k],
                &mut words[..kind.depth_words(k)],
            );
        }
        self.words.clear();
        self.halves.clear();
        self.magnitudes = Default::default();
        (self.kind, self.rows, self.k) = (kind, rows, k);
    }
}

/// Every row of panels `indices` of `product` on AMX, with the tile
/// configuration loaded once for them all (in a decode step's product,
/// a panel is a few µs of work).
///
/// # Safety
/// [`available`]; `product.lhs_rows` packed by
/// [`PackedRows::pack_for_amx`] for its depth and rows, its output as
/// [`Product`] says.
pub(super) unsafe fn panels(product: &Product<'_>, indices: std::ops::Range<usize>) {
    let mut tail = Tail([0u32; TILE_WORDS * PANEL]);
    let mut sums = Sums([0f32; SUMS]);
    // SAFETY: the CPU has AMX and the process its tile state (the
    // caller's promise); nothing between here and the release uses tiles.
    unsafe { asm!("ldtilecfg [{}]", in(reg) FULL_TILES.0.as_ptr(), options(nostack)) };
    for index in indices {
        // SAFETY: forwarded from the caller, the tiles configured.
        unsafe { panel(product, index, &mut tail, &mut sums) };
    }
    // SAFETY: as the configuration above.
    unsafe { asm!("tilerelease", options(nostack)) };
}

/// Every row of panel `index`, with `tail` and `sums` to work in.
///
/// # Safety
/// As [`panels`], the tile configuration loaded.
unsafe fn panel(product: &Product<'_>, index: usize, tail: &mut Tail, sums: &mut Sums) {
    let weights = product.weights;
    let depth_words = weights.kind.depth_words(weights.k);
    let (start, padded_width) = panel_bounds(weights.n, weights.panel, index);
    let width = (weights.n - start).min(weights.panel);
    let panel_words = &weights.words[start * depth_words..][..depth_words * padded_width];
    let full_steps = depth_words / TILE_WORDS;
    // The last depth tile's weights, zero beyond the depth, so that no
    // tile reads past the panel (activations are zero there too).
    let tail_depth = depth_words % TILE_WORDS;
    if tail_depth > 0 {
        let (rows, zeros) =
            tail.0[..TILE_WORDS * padded_width].split_at_mut(tail_depth * padded_width);
        rows.copy_from_slice(&panel_words[full_steps * TILE_WORDS * padded_width..]);
        zeros.fill(0);
    }
    let lhs_stride = depth_words.next_multiple_of(TILE_WORDS);
    debug_assert!(product.lhs_rows.len() >= product.m.next_multiple_of(BLOCK_ROWS) * lhs_stride);
    let block = |first_row: usize, first_column: usize| Block {
        lhs: product.lhs_rows[first_row * lhs_stride..].as_ptr(),
        lhs_stride_bytes: lhs_stride * 4,
        weights: panel_words[first_column..].as_ptr(),
        tail: tail.0[first_column..].as_ptr(),
        weights_stride_bytes: padded_width * 4,
        full_steps,
        has_tail: tail_depth > 0,
    };
    if product.m <= TILE_ROWS {
        // SAFETY: one tile of padded rows against the panel's column
        // tiles, its sums `[16][PANEL]` in `sums`.
        unsafe {
            block(0, 0).one_row_tile(padded_width / TILE_COLUMNS, sums);
            write_sums(product, sums, PANEL, (start, width), 0);
        }
        return;
    }
    for first_column in (0..padded_width).step_by(2 * TILE_COLUMNS) {
        let columns = (padded_width - first_column).min(2 * TILE_COLUMNS);
        let out_columns = (
            start + first_column,
            width.saturating_sub(first_column).min(columns),
        );
        for first_row in (0..product.m).step_by(BLOCK_ROWS) {
            let block = block(first_row, first_column);
            // SAFETY: a block's tiles read BLOCK_ROWS padded rows of the
            // activations and `columns` of the panel's (or the tail's)
            // depth words; its sums `[32][32]` fill `sums`.
            unsafe {
                if columns > TILE_COLUMNS {
                    block.two_column_tiles(sums);
                } else {
                    block.one_column_tile(sums);
                }
                write_sums(product, sums, 2 * TILE_COLUMNS, out_columns, first_row);
            }
        }
    }
}

/// f32 sums a block stores: 32 rows × 32 columns, or 16 rows × 64.
const SUMS: usize = BLOCK_ROWS * 2 * TILE_COLUMNS;

/// A block's sums, aligned as tile stores like them.
#[repr(C, align(64))]
struct Sums([f32; SUMS]);

/// A panel's last depth tile of weights, zero past the depth; its rows
/// start on cache lines, as the panel's own do.
#[repr(C, align(64))]
struct Tail([u32; TILE_WORDS * PANEL]);

/// `asm!` with `$lines` on the operands of [`Block`] `$block`: activation
/// tiles from `a0` and `a1` (strided `sa`), weights from `b` (strided
/// `sb`, `b_step` bytes a depth tile) for `steps` tiles, then from `tail`
/// when `has_tail`; sums to `c0` and `c1`, `[32][32]` f32 (strided `sc`)
/// in `$sums`.
macro_rules! block_asm {
    ($block:expr, $sums:expr, $($lines:literal,)*) => {{
        let sums_stride = 2 * TILE_COLUMNS * 4;
        asm!(
            $($lines,)*
            a0 = inout(reg) $block.lhs => _,
            a1 = inout(reg) $block.lhs.byte_add(TILE_ROWS * $block.lhs_stride_bytes) => _,
            sa = in(reg) $block.lhs_stride_bytes,
            b = inout(reg) $block.weights => _,
            sb = in(reg) $block.weights_stride_bytes,
            b_step = in(reg) TILE_WORDS * $block.weights_stride_bytes,
            tail = in(reg) $block.tail,
            steps = inout(reg) $block.full_steps => _,
            has_tail = in(reg) usize::from($block.has_tail),
            c0 = in(reg) $sums.0.as_mut_ptr(),
            c1 = in(reg) $sums.0.as_mut_ptr().byte_add(TILE_ROWS * sums_stride),
            sc = in(reg) sums_stride,
            options(nostack),
        )
    }};
}

/// `BLOCK_ROWS` rows × one or two tiles of columns over the whole depth.
struct Block {
    /// The block's first row of activations, padded.
    lhs: *const u32,
    lhs_stride_bytes: usize,
    /// The first column's weights at depth 0, and in the tail copy.
    weights: *const u32,
    tail: *const u32,
    weights_stride_bytes: usize,
    full_steps: usize,
    has_tail: bool,
}

impl Block {
    /// Sums of 32 rows × 32 columns into `sums` (`[32][32]`).
    ///
    /// # Safety
    /// The tile configuration loaded; the block's pointers as [`Block`]
    /// says, with 32 columns of weights.
    #[inline(always)]
    unsafe fn two_column_tiles(&self, sums: &mut Sums) {
        // SAFETY: (the caller's promise) every tile read lies inside the
        // activations, the panel or the tail; every store inside `sums`.
        unsafe {
            block_asm!(
                self,
                sums,
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "test {steps}, {steps}",
                "jz 3f",
                "2:",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b}, {b_step}",
                "dec {steps}",
                "jnz 2b",
                "3:",
                "test {has_tail}, {has_tail}",
                "jz 4f",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{tail} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{tail} + {sb}*1 + 64]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "4:",
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c0} + {sc}*1 + 64], tmm1",
                "tilestored [{c1} + {sc}*1], tmm2",
                "tilestored [{c1} + {sc}*1 + 64], tmm3",
            );
        }
    }

    /// Sums of 16 rows × `column_tiles` (1 to 4) tiles of 16 columns
    /// into `sums` (`[16][64]`): a decode step's product, which reads
    /// each weight once. A depth tile of a panel's weights is one stretch
    /// of memory, which this reads in order, prefetching the stretch two
    /// tiles on into L1 (AMX is Intel's, where `prefetchnta` would bypass
    /// L2: see `streams_past_caches`).
    ///
    /// # Safety
    /// As [`Block::two_column_tiles`], with `16 × column_tiles` columns
    /// of weights in rows of `weights_stride_bytes`.
    #[inline(always)]
    unsafe fn one_row_tile(&self, column_tiles: usize, sums: &mut Sums) {
        let sums_stride = PANEL * 4;
        let step_bytes = TILE_WORDS * self.weights_stride_bytes;
        // SAFETY: as in `two_column_tiles`: tiles past `column_tiles` are
        // neither loaded nor stored; prefetches never fault.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "test {steps}, {steps}",
                "jz 3f",
                "2:",
                "lea {line}, [{b} + 2*{b_step}]",
                "mov {lines}, {step_lines}",
                "5:",
                "prefetcht0 [{line}]",
                "add {line}, 64",
                "dec {lines}",
                "jnz 5b",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm5, [{b} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm5",
                "cmp {tiles}, 2",
                "jb 6f",
                "tileloadd tmm6, [{b} + {sb}*1 + 64]",
                "tdpbf16ps tmm1, tmm4, tmm6",
                "cmp {tiles}, 3",
                "jb 6f",
                "tileloadd tmm7, [{b} + {sb}*1 + 128]",
                "tdpbf16ps tmm2, tmm4, tmm7",
                "cmp {tiles}, 4",
                "jb 6f",
                "tileloadd tmm5, [{b} + {sb}*1 + 192]",
                "tdpbf16ps tmm3, tmm4, tmm5",
                "6:",
                "add {a}, 64",
                "add {b}, {b_step}",
                "dec {steps}",
                "jnz 2b",
                "3:",
                "test {has_tail}, {has_tail}",
                "jz 4f",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm5, [{tail} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm5",
                "cmp {tiles}, 2",
                "jb 4f",
                "tileloadd tmm6, [{tail} + {sb}*1 + 64]",
                "tdpbf16ps tmm1, tmm4, tmm6",
                "cmp {tiles}, 3",
                "jb 4f",
                "tileloadd tmm7, [{tail} + {sb}*1 + 128]",
                "tdpbf16ps tmm2, tmm4, tmm7",
                "cmp {tiles}, 4",
                "jb 4f",
                "tileloadd tmm5, [{tail} + {sb}*1 + 192]",
                "tdpbf16ps tmm3, tmm4, tmm5",
                "4:",
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c} + {sc}*1 + 64], tmm1",
                "tilestored [{c} + {sc}*1 + 128], tmm2",
                "tilestored [{c} + {sc}*1 + 192], tmm3",
                a = inout(reg) self.lhs => _,
                sa = in(reg) self.lhs_stride_bytes,
                b = inout(reg) self.weights => _,
                sb = in(reg) self.weights_stride_bytes,
                b_step = in(reg) step_bytes,
                step_lines = in(reg) step_bytes / 64,
                line = out(reg) _,
                lines = out(reg) _,
                tiles = in(reg) column_tiles,
                tail = in(reg) self.tail,
                steps = inout(reg) self.full_steps => _,
                has_tail = in(reg) usize::from(self.has_tail),
                c = in(reg) sums.0.as_mut_ptr(),
                sc = in(reg) sums_stride,
                options(nostack),
            );
        }
    }

    /// Sums of 32 rows × 16 columns into the first 16 of each row of
    /// `sums` (`[32][32]`).
    ///
    /// # Safety
    /// As [`Block::two_column_tiles`], with 16 columns of weights.
    #[inline(always)]
    unsafe fn one_column_tile(&self, sums: &mut Sums) {
        // SAFETY: as in `two_column_tiles`, reading 16 columns.
        unsafe {
            block_asm!(
                self,
                sums,
                "tilezero tmm0",
                "tilezero tmm2",
                "test {steps}, {steps}",
                "jz 3f",
                "2:",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b}, {b_step}",
                "dec {steps}",
                "jnz 2b",
                "3:",
                "test {has_tail}, {has_tail}",
                "jz 4f",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{tail} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "4:",
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm2",
            );
        }
    }
}

/// Writes (or adds) a block's sums, `[_][sums_stride]`, to the product's
/// rows from `first_row`, `columns` columns from `first_column`.
///
/// # Safety
/// The product's output as [`Product`] says; the columns inside it.
unsafe fn write_sums(
    product: &Product<'_>,
    sums: &Sums,
    sums_stride: usize,
    (first_column, columns): (usize, usize),
    first_row: usize,
) {
    let n = product.weights.n;
    let rows = (product.m - first_row).min(SUMS / sums_stride);
    for (row, sums) in sums.0.chunks_exact(sums_stride).take(rows).enumerate() {
        let sums = &sums[..columns];
        // SAFETY: the row and columns lie inside the output, which no
        // other task writes there.
        let out = unsafe {
            std::slice::from_raw_parts_mut(
                product.dst.0.add((first_row + row) * n + first_column),
                columns,
            )
        };
        if product.accumulate {
            out.iter_mut().zip(sums).for_each(|(out, sum)| *out += sum);
        } else {
            out.copy_from_slice(sums);
        }
    }
}
