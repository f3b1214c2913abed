//! Every kernel path against a naive i64 product, on random shapes and extremes.

use super::*;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
}

fn naive(x: &[u8], zp: i32, codes: &[i8], o: usize, k: usize) -> Vec<i32> {
    let m = x.len() / k;
    let mut out = vec![0i32; m * o];
    for mi in 0..m {
        for oi in 0..o {
            let s: i64 = (0..k)
                .map(|j| (x[mi * k + j] as i64 - zp as i64) * codes[oi * k + j] as i64)
                .sum();
            out[mi * o + oi] = i32::try_from(s).expect("fits");
        }
    }
    out
}

fn paths() -> Vec<Path> {
    let mut p = vec![Path::Portable];
    if has_avx2() {
        p.extend([Path::Avx2Madd, Path::Avx2Wide]);
    }
    if has_vnni() {
        p.push(Path::Vnni);
    }
    p
}

#[test]
fn all_paths_equal_naive_on_random_shapes() {
    let mut rng = Lcg(42);
    let shapes = [
        (1, 1, 1),
        (1, 3, 1),
        (3, 5, 7),
        (5, 17, 9),
        (7, 31, 13),
        (16, 32, 16),
        (17, 33, 5),
        (33, 65, 19),
        (64, 100, 10),
        (9, 127, 130),
        (65, 289, 37),
        (130, 70, 66),
        (19, 1031, 23),
        (50, 515, 9),
        // Up to GEMV_MAX positions: dot products (32- and 16-code steps, then a tail).
        (1, 3136, 12),
        (2, 1031, 5),
        (4, 97, 33),
        (GEMV_MAX + 1, 70, 6),
        // VNNI tiles: 8-row tiles and their remainders, 32- and 16-position tiles, masked
        // tails; dot products with 128-code steps and a masked tail.
        (49, 288, 64),
        (196, 144, 32),
        (31, 40, 15),
        (33, 600, 9),
        (1, 200, 3),
        (3, 128, 7),
    ];
    for &(m, k, o) in &shapes {
        for &(amax, zp_kind) in &[
            (127u32, 0),
            (127, 1),
            (127, 2),
            (255, 0),
            (255, 1),
            (255, 2),
        ] {
            let x: Vec<u8> = (0..m * k).map(|_| rng.below(amax + 1) as u8).collect();
            let mut codes: Vec<i8> = (0..o * k).map(|_| rng.below(256) as u8 as i8).collect();
            // Extreme codes at the start of each row: saturation-prone pairs.
            codes[0] = -128;
            let zp = match zp_kind {
                0 => 0,
                1 => 128,
                _ => rng.below(256) as i32,
            };
            let w = QuantizedWeight::from_codes(codes.clone(), &[o, k], &[0.1]).unwrap();
            let want = naive(&x, zp, &codes, o, k);
            for path in paths() {
                if path == Path::Avx2Madd && amax > 127 {
                    continue;
                }
                let got = gemm_rows(path, &x, zp, w.packed()).unwrap();
                assert_eq!(got, want, "{path:?} m={m} k={k} o={o} amax={amax} zp={zp}");
            }
            let auto = gemm_u8_i8(&x, zp, &w, Kernel::Auto).unwrap();
            assert_eq!(auto, want);
        }
    }
}

#[test]
fn saturation_prone_extremes() {
    // Every product at its extreme: x = 255 / 127 against w = -128 / 127.
    for &(xv, wv) in &[
        (255u8, -128i8),
        (255, 127),
        (127, -128),
        (127, 127),
        (0, -128),
    ] {
        let (m, k, o) = (5, 37, 6);
        let x = vec![xv; m * k];
        let codes = vec![wv; o * k];
        let w = QuantizedWeight::from_codes(codes.clone(), &[o, k], &[1.0]).unwrap();
        for zp in [0, 128, 255] {
            let want = naive(&x, zp, &codes, o, k);
            for path in paths() {
                if path == Path::Avx2Madd && xv > 127 {
                    continue;
                }
                assert_eq!(
                    gemm_rows(path, &x, zp, w.packed()).unwrap(),
                    want,
                    "{path:?}"
                );
            }
            assert_eq!(gemm_u8_i8(&x, zp, &w, Kernel::Auto).unwrap(), want);
        }
    }
    // The saturating path really would be wrong on full-range codes: the kernel choice
    // must avoid it.
    if has_avx2() {
        assert_eq!(Kernel::Avx2.path(255).unwrap(), Path::Avx2Wide);
        assert_eq!(Kernel::Avx2.path(127).unwrap(), Path::Avx2Madd);
        // One position (dot products) and 8 positions (tiles).
        for (m, k) in [(1, 32), (8, 8)] {
            let x = vec![255u8; m * k];
            let codes = vec![-128i8; k];
            let w = QuantizedWeight::from_codes(codes.clone(), &[1, k], &[1.0]).unwrap();
            let sat = gemm_rows(Path::Avx2Madd, &x, 0, w.packed()).unwrap();
            assert_ne!(sat, naive(&x, 0, &codes, 1, k), "m = {m}");
        }
    }
}

#[test]
fn longest_rows_stay_exact() {
    let k = MAX_ROW_LEN;
    let x = vec![255u8; k];
    let codes = vec![-128i8; k];
    let w = QuantizedWeight::from_codes(codes.clone(), &[1, k], &[1.0]).unwrap();
    let want = naive(&x, 0, &codes, 1, k);
    for path in paths() {
        if path != Path::Avx2Madd {
            assert_eq!(
                gemm_rows(path, &x, 0, w.packed()).unwrap(),
                want,
                "{path:?}"
            );
        }
    }
    assert!(QuantizedWeight::from_codes(vec![0; k + 1], &[1, k + 1], &[1.0]).is_err());
}

#[test]
fn parallel_blocks_match() {
    let mut rng = Lcg(7);
    let (m, k, o) = (100, 301, 150);
    let x: Vec<u8> = (0..m * k).map(|_| rng.below(256) as u8).collect();
    let codes: Vec<i8> = (0..o * k).map(|_| rng.below(256) as u8 as i8).collect();
    let w = QuantizedWeight::from_codes(codes.clone(), &[o, k], &[0.1]).unwrap();
    let want = naive(&x, 77, &codes, o, k);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    for path in paths() {
        let x = if path == Path::Avx2Madd {
            x.iter().map(|&v| v / 2).collect()
        } else {
            x.clone()
        };
        let want = if path == Path::Avx2Madd {
            naive(&x, 77, &codes, o, k)
        } else {
            want.clone()
        };
        let got = pool
            .install(|| gemm_rows(path, &x, 77, w.packed()))
            .unwrap();
        assert_eq!(got, want, "{path:?}");
    }
}

#[test]
fn bad_arguments() {
    let w = QuantizedWeight::from_codes(vec![1, 2, 3, 4], &[2, 2], &[0.1]).unwrap();
    assert!(gemm_u8_i8(&[1, 2, 3], 0, &w, Kernel::Auto).is_err());
    assert!(gemm_u8_i8(&[1, 2], 256, &w, Kernel::Auto).is_err());
    assert_eq!(
        gemm_u8_i8(&[], 0, &w, Kernel::Auto).unwrap(),
        Vec::<i32>::new()
    );
    assert_eq!(Kernel::Portable.resolved(), Kernel::Portable);
    assert!(Kernel::Auto.is_available());
    assert_eq!(Kernel::Avx512Vnni.is_available(), has_vnni());
    if has_vnni() {
        // Any activation codes: one path.
        assert_eq!(Kernel::Avx512Vnni.path(255).unwrap(), Path::Vnni);
        assert_eq!(Kernel::Avx512Vnni.path(0).unwrap(), Path::Vnni);
    } else {
        assert!(Kernel::Avx512Vnni.path(0).is_err());
    }
    // Auto takes the best kernel the CPU has (under QAT_INT8_KERNEL, unset in tests).
    if std::env::var_os("QAT_INT8_KERNEL").is_none() {
        let best = if has_vnni() {
            Kernel::Avx512Vnni
        } else if has_avx2() {
            Kernel::Avx2
        } else {
            Kernel::Portable
        };
        assert_eq!(Kernel::Auto.resolved(), best);
    }
}

/// Operands that do not fit together are errors on every path (the AVX2 block included),
/// never out-of-bounds reads or writes.
#[test]
fn mismatched_operands_are_errors() {
    let (m, k, o) = (20, 9, 6);
    let x = vec![3u8; m * k];
    let w = QuantizedWeight::from_codes(vec![1; o * k], &[o, k], &[0.1]).unwrap();
    let pw = w.packed();
    let panel = Panel::from_rows(&x, m, k);
    for path in paths() {
        let mut out = vec![0i32; o * m];
        gemm(path, pw, 0..o, &panel, 0, &mut out).unwrap();
        assert_eq!(out, vec![9 * 3; o * m], "{path:?}");
        // Rows past the weight.
        let mut big = vec![0i32; (o + 4) * m];
        assert!(
            gemm(path, pw, 0..o + 4, &panel, 0, &mut big).is_err(),
            "{path:?}"
        );
        assert!(
            gemm(path, pw, 3..o + 1, &panel, 0, &mut big).is_err(),
            "{path:?}"
        );
        // Too few outputs.
        let mut short = vec![0i32; o * m - 1];
        assert!(
            gemm(path, pw, 0..o, &panel, 0, &mut short).is_err(),
            "{path:?}"
        );
        // A panel packed for another row length (shorter: the kernels would read past it).
        let narrow = Panel::from_rows(&x[..m * 4], m, 4);
        assert!(
            gemm(path, pw, 0..o, &narrow, 0, &mut out).is_err(),
            "{path:?}"
        );
        // Dot products: rows of the wrong length, too few outputs.
        let mut acc = vec![0i32; o * 2];
        gemv(path, pw, &x[..2 * k], 0, &mut acc).unwrap();
        assert!(
            gemv(path, pw, &x[..2 * k + 1], 0, &mut acc).is_err(),
            "{path:?}"
        );
        assert!(
            gemv(path, pw, &x[..2 * k], 0, &mut acc[..o]).is_err(),
            "{path:?}"
        );
    }
}

#[test]
fn kernel_cap_names() {
    assert_eq!(parse_cap("portable"), Some(Kernel::Portable));
    assert_eq!(parse_cap("avx2"), Some(Kernel::Avx2));
    assert_eq!(parse_cap("avx512vnni"), Some(Kernel::Avx512Vnni));
    assert_eq!(parse_cap("AVX2"), None);
    assert_eq!(parse_cap(""), None);
    // The cap orders kernels by speed: Auto resolves to the best one at or below it.
    assert!(rank(Kernel::Portable) < rank(Kernel::Avx2));
    assert!(rank(Kernel::Avx2) < rank(Kernel::Avx512Vnni));
}
