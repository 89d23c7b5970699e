use rand::{Rng, SeedableRng};

use super::*;

fn bf16_value(value: f32) -> f32 {
    f32::from_bits(to_bf16_bits(value) << 16)
}

/// The promised sums written out in scalars, per output from zero: f32,
/// one fused multiply-add per depth in order; bf16, pair after pair, the
/// odd depth's product then the even one's, each rounded and flushed.
fn product_in_the_promised_order(
    kind: Words,
    lhs: &[f32],
    weights: &[f32],
    (m, k, n): (usize, usize, usize),
) -> Vec<f32> {
    let mut dst = vec![0f32; m * n];
    for row in 0..m {
        for column in 0..n {
            let x = |depth: usize| lhs[row * k + depth];
            let w = |depth: usize| weights[depth * n + column];
            let mut sum = 0f32;
            match kind {
                Words::F32 => {
                    for depth in 0..k {
                        sum = x(depth).mul_add(w(depth), sum);
                    }
                }
                Words::Bf16Pairs => {
                    for even in (0..k).step_by(2) {
                        let odd = even + 1;
                        if odd < k {
                            sum = flush_subnormal(sum + bf16_value(x(odd)) * bf16_value(w(odd)));
                        }
                        sum = flush_subnormal(sum + bf16_value(x(even)) * bf16_value(w(even)));
                    }
                }
            }
            dst[row * n + column] = sum;
        }
    }
    dst
}

/// The first `count` rows of `lhs [_, k]`, laid out for `kind`.
fn rows(kind: Words, lhs: &[f32], count: usize, k: usize) -> PackedRows {
    let mut packed = PackedRows::default();
    packed.pack(kind, &lhs[..count * k], count, k);
    packed
}

fn random(rng: &mut impl Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1f32..1.0)).collect()
}

#[test]
fn products_sum_in_the_promised_order_bit_for_bit() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    // Odd depth, a partial last panel and a partial last register, rows
    // that leave a partial block; a single column; a depth of two; a depth
    // the AVX-512 kernel takes in chunks (three in f32, two in bf16); one
    // block deep enough that its weights stream past the prefetch distance.
    for (m, k, n) in [
        (13, 301, 150),
        (1, 64, 1),
        (7, 2, 64),
        (13, 2500, 70),
        (2, 700, 40),
    ] {
        let lhs = random(&mut rng, m * k);
        let weights = random(&mut rng, k * n);
        let start = random(&mut rng, m * n);
        for kind in [Words::F32, Words::Bf16Pairs] {
            let packed = PanelMatrix::pack(kind, k, n, |row, column| weights[row * n + column]);
            let fresh = product_in_the_promised_order(kind, &lhs, &weights, (m, k, n));
            let added: Vec<f32> = start.iter().zip(&fresh).map(|(a, b)| a + b).collect();
            for (threads, task_columns, accumulate) in [(1, 64, true), (2, 64, true), (2, 1, false)]
            {
                let mut dst = start.clone();
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| {
                        packed.multiply(
                            &mut dst,
                            &rows(kind, &lhs, m, k),
                            threads,
                            accumulate,
                            task_columns,
                        )
                    });
                let want = if accumulate { &added } else { &fresh };
                let context = format!("{kind:?} {m}x{k}x{n}, {threads} threads, {accumulate}");
                if Some(Kernel::fastest(kind)) == amx_kernel() {
                    let start = if accumulate { &start[..] } else { &[] };
                    assert_within_amx_rounding(
                        &dst,
                        want,
                        start,
                        &lhs,
                        &weights,
                        (m, k, n),
                        &context,
                    );
                } else {
                    assert_eq!(&dst, want, "{context}");
                }
            }
        }
    }
}

/// The AMX kernel where this CPU runs it, else one no product runs on.
fn amx_kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        return Some(Kernel::Amx);
    }
    None
}

/// `got` is `want` (the promised order) within what AMX's own rounding
/// of each instruction's 32 bf16 products can change: a few units in the
/// last place of the sum of magnitudes per instruction, plus the rounding
/// of adding to `start` (empty: written, not added).
fn assert_within_amx_rounding(
    got: &[f32],
    want: &[f32],
    start: &[f32],
    lhs: &[f32],
    weights: &[f32],
    (m, k, n): (usize, usize, usize),
    context: &str,
) {
    let instructions = k.div_ceil(32) as f64 + 1.0;
    for row in 0..m {
        for column in 0..n {
            let magnitude: f64 = (0..k)
                .map(|depth| {
                    f64::from(bf16_value(lhs[row * k + depth]))
                        * f64::from(bf16_value(weights[depth * n + column]))
                })
                .map(f64::abs)
                .sum::<f64>()
                + start
                    .get(row * n + column)
                    .map_or(0.0, |v| f64::from(v.abs()));
            let at = row * n + column;
            let tolerance = 4.0 * instructions * magnitude * f64::from(f32::EPSILON);
            let error = (f64::from(got[at]) - f64::from(want[at])).abs();
            assert!(
                error <= tolerance,
                "{context}: [{row}, {column}] {} against {} (tolerance {tolerance:e})",
                got[at],
                want[at]
            );
        }
    }
}

#[test]
fn amx_products_are_the_promised_sums_within_its_rounding() {
    let Some(kernel) = amx_kernel() else {
        eprintln!("this CPU has no AMX (or MOEMESH_NO_AMX is set): nothing to check");
        return;
    };
    assert_eq!(Kernel::fastest(Words::Bf16Pairs), kernel);
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    // Rows of one tile (a decode step's path) and of one block, of a block
    // and a bit, of several blocks; depths of whole tiles, of a partial
    // tile only, and of both; panels of one, two, three and four column
    // tiles, the last partial.
    for (m, k, n) in [
        (1, 64, 16),
        (16, 32, 32),
        (5, 70, 64),
        (31, 2, 48),
        (33, 33, 150),
        (70, 1024, 64),
        (8, 2816, 40),
        (17, 301, 200),
    ] {
        let lhs = random(&mut rng, m * k);
        let weights = random(&mut rng, k * n);
        let start = random(&mut rng, m * n);
        let packed = PanelMatrix::pack(Words::Bf16Pairs, k, n, |row, column| {
            weights[row * n + column]
        });
        let fresh = product_in_the_promised_order(Words::Bf16Pairs, &lhs, &weights, (m, k, n));
        let lhs_rows = rows(Words::Bf16Pairs, &lhs, m, k);
        // Row after row, each padded to whole depth tiles.
        let stride = k.div_ceil(2).next_multiple_of(amx::TILE_WORDS);
        assert!(lhs_rows.words.is_empty());
        assert_eq!(
            lhs_rows.row_major.len(),
            m.next_multiple_of(amx::BLOCK_ROWS) * stride
        );
        for index in 0..k.div_ceil(2) {
            let word = Words::Bf16Pairs.word(index, k, |depth| lhs[(m - 1) * k + depth]);
            assert_eq!(lhs_rows.row_major[(m - 1) * stride + index], word);
        }
        let mut written = vec![f32::NAN; m * n];
        packed.multiply(&mut written, &lhs_rows, 1, false, PANEL);
        let context = format!("{m}x{k}x{n} written");
        assert_within_amx_rounding(&written, &fresh, &[], &lhs, &weights, (m, k, n), &context);
        // Added: the same sums, added to what was there.
        let mut added = start.clone();
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap()
            .install(|| packed.multiply(&mut added, &lhs_rows, 2, true, 16));
        let sums: Vec<f32> = start.iter().zip(&written).map(|(a, b)| a + b).collect();
        assert_eq!(added, sums, "{m}x{k}x{n}: adding is writing, then adding");
    }
}

#[test]
fn every_kernel_computes_what_the_portable_kernel_computes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let k = 200;
    // Ordinary values, and magnitudes from 1e-25 to 1e3, so that sums
    // round, products cancel and some results fall below the normal range
    // (bf16 products that a fused multiply-add would not compute alike).
    for wide in [false, true] {
        let mut values = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    let magnitude = if wide {
                        10f32.powf(rng.random_range(-25f32..3.0))
                    } else {
                        rng.random_range(0f32..2.0)
                    };
                    if rng.random_bool(0.5) {
                        magnitude
                    } else {
                        -magnitude
                    }
                })
                .collect()
        };
        // Every row count the kernels specialise; a whole panel, one whose
        // last register is partial, and AVX2's 16-column panels whole and
        // partial; written and added.
        let shapes = [
            (6, 64, false),
            (2, 64, true),
            (1, 40, false),
            (5, 40, true),
            (3, 16, false),
            (4, 10, true),
        ];
        for (m, n, accumulate) in shapes {
            let (lhs, weights, start) = (values(m * k), values(k * n), values(m * n));
            for kind in [Words::F32, Words::Bf16Pairs] {
                // One tile of the widest panel, which every kernel runs.
                let packed = PanelMatrix::pack_in_panels(kind, k, n, PANEL, |row, column| {
                    weights[row * n + column]
                });
                // In blocks, as the tile kernels read them, with what the
                // AVX2 kernel reads beside them.
                let mut packed_lhs = PackedRows::default();
                packed_lhs.pack_blocks(kind, &lhs, m, k);
                packed_lhs.prepare_for_avx2();
                let exact_products = packed_lhs.magnitudes.products_exact(packed.magnitudes);
                assert_eq!(exact_products, !wide || kind == Words::F32);
                let on = |kernel: Kernel| {
                    let mut dst = start.clone();
                    let tile = Tile {
                        kind,
                        lhs: &packed_lhs.words,
                        lhs_halves: &packed_lhs.halves,
                        weights: &packed.words,
                        padded_width: padded_columns(n, PANEL),
                        dst: dst.as_mut_ptr(),
                        dst_row_stride: n,
                        rows: m,
                        width: n,
                        accumulate,
                        exact_products,
                        carry: Carry::WHOLE,
                        prefetch: Prefetch::NONE,
                    };
                    tile.run_on(kernel);
                    dst.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let portable = on(Kernel::Portable);
                for kernel in Kernel::available(kind) {
                    assert_eq!(
                        on(kernel),
                        portable,
                        "{kernel:?} {kind:?} {m}x{n}, wide {wide}"
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_products_are_exact_only_inside_the_range_that_needs_no_flush() {
    let of = |values: &[f32]| {
        let words: Vec<u32> = values
            .chunks(2)
            .map(|pair| to_bf16_bits(pair[0]) | to_bf16_bits(pair[1]) << 16)
            .collect();
        Magnitudes::of(Words::Bf16Pairs, &words)
    };
    let ordinary = of(&[0.5, -3.0, 0.0, 1e-3]);
    assert!(ordinary.products_exact(of(&[2e-20, 7.0])));
    // 1e-3 · 1e-28 < 2^-102: its sums could fall below the normal range.
    assert!(!ordinary.products_exact(of(&[1e-28, 1.0])));
    assert!(!ordinary.products_exact(of(&[1e38, 1.0])));
    assert!(!ordinary.products_exact(of(&[f32::NAN, 1.0])));
    assert!(ordinary.products_exact(of(&[0.0, 0.0])));
}

#[test]
fn activations_round_to_nearest_even_and_flush_subnormals() {
    // 1 + 2^-8 lies halfway between two bf16 values: ties to even.
    assert_eq!(to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
    assert_eq!(to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
    assert_eq!(to_bf16_bits(1e-40), 0);
    assert_eq!(to_bf16_bits(-1e-40), 0x8000);
    assert_eq!(to_bf16_bits(-2.0), 0xc000);
}

#[test]
fn rounding_to_bf16_matches_the_half_crate_and_flushes_subnormals() {
    // Every sign, exponent and high mantissa, with the low bits that
    // decide rounding: none, sticky only, just under, at and just over
    // half a unit, all ones.
    for high in 0..=u16::MAX as u32 {
        for low in [0, 1, 0x4000, 0x7fff, 0x8000, 0x8001, 0xffff] {
            let value = f32::from_bits(high << 16 | low);
            let reference = half::bf16::from_f32(value).to_bits() as u32;
            let flushed = if reference & 0x7f80 == 0 {
                reference & 0x8000
            } else {
                reference
            };
            assert_eq!(
                to_bf16_bits(value),
                flushed,
                "bits {:#010x}",
                value.to_bits()
            );
        }
    }
}

#[test]
fn rows_pack_to_the_portable_words_on_every_cpu() {
    // What this CPU runs (its widest vectors) against the portable loop a
    // CPU without them runs: every sign, exponent and high mantissa with
    // the low bits that decide rounding, in rows of every length up to two
    // registers and more, so that every remainder and an odd tail occur.
    let values: Vec<f32> = (0..=u16::MAX as u32)
        .flat_map(|high| [0, 0x7fff, 0x8000, 0x8001].map(|low| f32::from_bits(high << 16 | low)))
        .collect();
    for kind in [Words::F32, Words::Bf16Pairs] {
        let (mut start, mut lengths) = (0, (1..=70).cycle());
        while start < values.len() {
            let len = lengths.next().expect("cycles");
            let row = &values[start..(start + len).min(values.len())];
            let words_of = |row_words: fn(Words, &[f32], &mut [u32])| {
                let mut words = vec![0u32; kind.depth_words(row.len())];
                row_words(kind, row, &mut words);
                words
            };
            assert_eq!(
                words_of(Words::row_words),
                words_of(Words::row_words_portable),
                "{kind:?}, {len} values from {start}"
            );
            start += len;
        }
    }
}

#[test]
fn magnitudes_are_the_smallest_nonzero_and_the_largest_value() {
    let cases: [&[f32]; 6] = [
        &[],
        &[0.0, -0.0],
        &[0.5, -3.0, 0.0, 1e-3, -7e-30],
        &[f32::NAN, 2.0],
        &[f32::INFINITY, -0.0],
        &[-f32::NAN, 1e-37, 3e38, 1.0],
    ];
    for values in cases {
        let mut words = vec![0u32; values.len().div_ceil(2)];
        Words::Bf16Pairs.row_words(values, &mut words);
        let magnitudes = Magnitudes::of(Words::Bf16Pairs, &words);
        let rounded: Vec<f32> = words
            .iter()
            .flat_map(|&word| [low(word), high(word)])
            .collect();
        let smallest = rounded
            .iter()
            .map(|value| value.abs())
            .filter(|&value| value != 0.0 && value < f32::INFINITY)
            .fold(f32::INFINITY, f32::min);
        let largest = rounded
            .iter()
            .map(|value| {
                if value.is_nan() {
                    f32::INFINITY
                } else {
                    value.abs()
                }
            })
            .fold(0.0, f32::max);
        assert_eq!(
            magnitudes.smallest.to_bits(),
            smallest.to_bits(),
            "{values:?}"
        );
        assert_eq!(
            magnitudes.largest.to_bits(),
            largest.to_bits(),
            "{values:?}"
        );
    }
}

#[test]
fn packed_rows_hold_each_value_word_by_word() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // One PackedRows for all, as a backend reuses it: nothing stays from
    // a larger earlier pack.
    let mut packed = PackedRows::default();
    for kind in [Words::F32, Words::Bf16Pairs] {
        for (rows, k) in [(13, 64), (7, 33), (1, 1)] {
            let lhs = random(&mut rng, rows * k);
            packed.pack_blocks(kind, &lhs, rows, k);
            let depth_words = kind.depth_words(k);
            assert_eq!(packed.words.len(), rows.div_ceil(ROWS) * depth_words * ROWS);
            for row in 0..rows.div_ceil(ROWS) * ROWS {
                for index in 0..depth_words {
                    let expected = if row < rows {
                        kind.word(index, k, |depth| lhs[row * k + depth])
                    } else {
                        0
                    };
                    let at = row / ROWS * depth_words * ROWS + index * ROWS + row % ROWS;
                    assert_eq!(
                        packed.words[at], expected,
                        "{kind:?} row {row} word {index}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_row_is_the_same_in_every_batch() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let (k, n) = (97, 200);
    let weights = random(&mut rng, k * n);
    let lhs = random(&mut rng, 40 * k);
    for kind in [Words::F32, Words::Bf16Pairs] {
        let packed = PanelMatrix::pack(kind, k, n, |row, column| weights[row * n + column]);
        let mut alone = vec![0f32; n];
        packed.multiply(&mut alone, &rows(kind, &lhs, 1, k), 1, false, PANEL);
        for count in [2, 5, 6, 7, 12, 40] {
            let mut dst = vec![0f32; count * n];
            packed.multiply(&mut dst, &rows(kind, &lhs, count, k), 1, false, PANEL);
            assert_eq!(&dst[..n], &alone[..], "{kind:?}, {count} rows");
        }
    }
}

#[test]
fn panels_pad_to_whole_registers() {
    assert_eq!(padded_columns(64, PANEL), 64);
    assert_eq!(padded_columns(65, PANEL), 80);
    assert_eq!(padded_columns(150, PANEL), 160);
    assert_eq!(padded_columns(150, 16), 160);
    assert_eq!(panel_bounds(150, PANEL, 2), (128, 32));
    assert_eq!(panel_bounds(150, 16, 9), (144, 16));
    let packed = PanelMatrix::pack(Words::Bf16Pairs, 5, 150, |_, _| 1.0);
    // Three depth pairs of 160 columns, four bytes each.
    assert_eq!(packed.bytes(), 3 * 160 * 4);
}

/// Each register or tile row of weights the kernels load, and each AMX
/// row of activations, is one whole cache line: never split across two.
#[test]
fn weights_and_amx_rows_start_on_cache_lines() {
    let on_line = |address: *const u32| (address as usize).is_multiple_of(64);
    for kind in [Words::F32, Words::Bf16Pairs] {
        for (k, n, panel) in [
            (301, 150, PANEL),
            (5, 150, 16),
            (64, 1, 32),
            (2816, 1024, PANEL),
        ] {
            let packed = PanelMatrix::pack_in_panels(kind, k, n, panel, |_, _| 1.0);
            let depth_words = kind.depth_words(k);
            for index in 0..n.div_ceil(panel) {
                let (start, padded_width) = panel_bounds(n, panel, index);
                for depth in [0, depth_words / 2, depth_words - 1] {
                    let row = start * depth_words + depth * padded_width;
                    assert!(
                        on_line(packed.words[row..].as_ptr()),
                        "{kind:?} [{k}, {n}] in panels of {panel}: panel {index}, depth word {depth}"
                    );
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        // One buffer, packed again at larger and smaller sizes.
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut packed = PackedRows::default();
        for (rows, k) in [(3, 70), (40, 1024), (1, 33)] {
            packed.pack_for_amx(&random(&mut rng, rows * k), rows, k);
            let stride = Words::Bf16Pairs.depth_words(k).next_multiple_of(16);
            for row in 0..rows {
                let address = packed.row_major[row * stride..].as_ptr();
                assert!(on_line(address), "row {row} of [{rows}, {k}]");
            }
        }
    }
}

#[test]
fn products_are_the_same_in_every_panel_width() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let (m, k, n) = (9, 70, 150);
    let (lhs, weights) = (random(&mut rng, m * k), random(&mut rng, k * n));
    for kind in [Words::F32, Words::Bf16Pairs] {
        let products: Vec<Vec<f32>> = [16, 32, PANEL]
            .into_iter()
            .map(|panel| {
                let packed = PanelMatrix::pack_in_panels(kind, k, n, panel, |row, column| {
                    weights[row * n + column]
                });
                let mut dst = vec![0f32; m * n];
                packed.multiply(&mut dst, &rows(kind, &lhs, m, k), 1, false, PANEL);
                dst
            })
            .collect();
        assert_eq!(products[0], products[1], "{kind:?}");
        assert_eq!(products[0], products[2], "{kind:?}");
    }
}
