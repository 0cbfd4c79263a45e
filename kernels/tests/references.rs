//! CPU tests: the slow references are trusted because they agree with libtorch's SDPA and
//! rms_norm; the fused entry points refuse CPU tensors with a clear error; NVRTC compiles.
use kernels::attention::{self, AttentionMask};
use kernels::{compile, rmsnorm};
use tch::{Device, Kind, Tensor};

const F64: (Kind, Device) = (Kind::Double, Device::Cpu);

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn reference_matches_sdpa_causal_gqa() {
    tch::manual_seed(1);
    let (b, h, hk, s, d) = (2, 8, 2, 33, 16);
    let q = Tensor::randn([b, h, s, d], F64);
    let k = Tensor::randn([b, hk, s, d], F64);
    let v = Tensor::randn([b, hk, s, d], F64);
    let mask = AttentionMask {
        causal: true,
        ..Default::default()
    };
    let ours = attention::reference(&q, &k, &v, &mask, 0.25);
    let sdpa =
        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, 0.25, true);
    assert!(max_abs_diff(&ours, &sdpa) < 1e-12);
}

#[test]
fn reference_matches_sdpa_with_key_padding_and_blocks() {
    tch::manual_seed(2);
    let (b, h, sq, sk, d) = (2, 4, 9, 12, 8);
    let q = Tensor::randn([b, h, sq, d], F64);
    let k = Tensor::randn([b, h, sk, d], F64);
    let v = Tensor::randn([b, h, sk, d], F64);
    let keep = Tensor::rand([b, sk], F64).gt(0.3);
    let _ = keep.narrow(1, 0, 1).fill_(1); // every row keeps at least key 0 for the SDPA comparison
    let blocks = Tensor::rand([b, sq, 3], F64).gt(0.4);
    let _ = blocks.narrow(2, 0, 1).fill_(1);
    let mask = AttentionMask {
        key_keep: Some(&keep),
        block_mask: Some((&blocks, 4)),
        ..Default::default()
    };
    let dense = attention::dense_mask(&mask, b, sq, sk, Device::Cpu);
    let ours = attention::reference(&q, &k, &v, &mask, 0.3);
    let sdpa =
        Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&dense), 0.0, false, 0.3, false);
    assert!(max_abs_diff(&ours, &sdpa) < 1e-12);
}

#[test]
fn dense_mask_spells_out_each_rule() {
    // causal, bottom-right aligned: with Sq=2, Sk=4 row 0 sees keys 0..=2, row 1 all keys
    let m = attention::dense_mask(
        &AttentionMask {
            causal: true,
            ..Default::default()
        },
        1,
        2,
        4,
        Device::Cpu,
    );
    let got: Vec<i64> = Vec::try_from(m.to_kind(Kind::Int64).flatten(0, -1)).unwrap();
    assert_eq!(got, vec![1, 1, 1, 0, 1, 1, 1, 1]);
    // Mllama vision rule: padded queries (flag set) do not see padded keys; real queries see all
    let keep = Tensor::from_slice(&[1u8, 1, 0]).view([1, 3]);
    let flags = Tensor::from_slice(&[0u8, 0, 1]).view([1, 3]);
    let m = attention::dense_mask(
        &AttentionMask {
            key_keep: Some(&keep),
            query_flags: Some(&flags),
            ..Default::default()
        },
        1,
        3,
        3,
        Device::Cpu,
    );
    let got: Vec<i64> = Vec::try_from(m.to_kind(Kind::Int64).flatten(0, -1)).unwrap();
    assert_eq!(got, vec![1, 1, 1, 1, 1, 1, 1, 1, 0]);
    // block mask: query 0 sees block 1 only (keys 2, 3)
    let bm = Tensor::from_slice(&[0u8, 1]).view([1, 1, 2]);
    let m = attention::dense_mask(
        &AttentionMask {
            block_mask: Some((&bm, 2)),
            ..Default::default()
        },
        1,
        1,
        4,
        Device::Cpu,
    );
    let got: Vec<i64> = Vec::try_from(m.to_kind(Kind::Int64).flatten(0, -1)).unwrap();
    assert_eq!(got, vec![0, 0, 1, 1]);
}

#[test]
fn fully_masked_rows_give_zero_output_and_finite_gradients() {
    let (b, h, sq, sk, d) = (1, 2, 3, 4, 8);
    let q = Tensor::randn([b, h, sq, d], F64).set_requires_grad(true);
    let k = Tensor::randn([b, h, sk, d], F64).set_requires_grad(true);
    let v = Tensor::randn([b, h, sk, d], F64).set_requires_grad(true);
    let bm = Tensor::from_slice(&[0u8, 1, 1]).view([1, 3, 1]); // row 0 sees nothing
    let mask = AttentionMask {
        block_mask: Some((&bm, 4)),
        ..Default::default()
    };
    let out = attention::reference(&q, &k, &v, &mask, 0.5);
    assert_eq!(
        out.narrow(2, 0, 1)
            .abs()
            .sum(Kind::Double)
            .double_value(&[]),
        0.0
    );
    out.sum(Kind::Double).backward();
    for t in [&q, &k, &v] {
        assert_eq!(t.grad().isfinite().all().int64_value(&[]), 1);
    }
    assert_eq!(
        q.grad()
            .narrow(2, 0, 1)
            .abs()
            .sum(Kind::Double)
            .double_value(&[]),
        0.0
    );
}

/// The lse the checks hold the forward's to is the log2 of the reference's softmax denominator:
/// 2^(scale * q.k * log2(e) - lse) over the allowed keys are the reference's probabilities (they
/// give its output), and a row that sees no key has -inf.
#[test]
fn reference_lse_is_the_log2_softmax_denominator() {
    tch::manual_seed(3);
    let (b, h, hk, sq, sk, d) = (2, 4, 2, 5, 8, 16);
    let q = Tensor::randn([b, h, sq, d], F64);
    let k = Tensor::randn([b, hk, sk, d], F64);
    let v = Tensor::randn([b, hk, sk, d], F64);
    let blocks = Tensor::ones([b, sq, 2], (Kind::Uint8, Device::Cpu));
    let _ = blocks.get(1).narrow(1, 1, 1).fill_(0);
    let _ = blocks.narrow(1, 0, 1).fill_(0); // row 0 sees no key
    let mask = AttentionMask {
        causal: true,
        block_mask: Some((&blocks, 4)),
        ..Default::default()
    };
    let scale = 0.3;
    let lse = attention::reference_lse(&q, &k, &mask, scale); // (B, H, Sq)
    assert_eq!(lse.size(), [b, h, sq]);
    let no_key = lse.narrow(2, 0, 1);
    assert_eq!(no_key.isneginf().all().int64_value(&[]), 1);
    let rest = lse.narrow(2, 1, sq - 1);
    assert_eq!(rest.isfinite().all().int64_value(&[]), 1);
    let kr = k.repeat_interleave_self_int(h / hk, 1, None);
    let vr = v.repeat_interleave_self_int(h / hk, 1, None);
    let scores = q.matmul(&kr.transpose(-2, -1)) * scale; // (B, H, Sq, Sk)
    let allowed = attention::dense_mask(&mask, b, sq, sk, Device::Cpu);
    let probs = (scores - lse.unsqueeze(-1) * std::f64::consts::LN_2)
        .exp()
        .masked_fill(&allowed.logical_not(), 0.0);
    let sums = probs.sum_dim_intlist([-1i64].as_slice(), false, Kind::Double);
    let ones = sums.narrow(2, 1, sq - 1);
    assert!(max_abs_diff(&ones, &ones.ones_like()) < 1e-12);
    let out = attention::reference(&q, &k, &v, &mask, scale);
    assert!(max_abs_diff(&probs.matmul(&vr), &out) < 1e-12);
}

#[test]
fn rmsnorm_reference_matches_libtorch() {
    let x = Tensor::randn([5, 24], F64);
    let w = Tensor::randn([24], F64);
    let ours = rmsnorm::reference(&x, &w, 1e-6);
    let torch = x.rms_norm([24], Some(&w), 1e-6);
    assert!(max_abs_diff(&ours, &torch) < 1e-12);
}

#[test]
fn fused_entry_points_refuse_cpu_tensors() {
    let q = Tensor::randn([1, 1, 4, 64], (Kind::BFloat16, Device::Cpu));
    let err = attention::fused_forward(&q, &q, &q, &AttentionMask::default(), 0.125)
        .err()
        .expect("CPU must be refused");
    assert!(err.to_string().contains("needs CUDA tensors"), "{err}");
    let x = Tensor::randn([2, 8], (Kind::BFloat16, Device::Cpu));
    let w = Tensor::ones([8], (Kind::BFloat16, Device::Cpu));
    let err = rmsnorm::fused_forward(&x, &w, 1e-5).expect_err("CPU must be refused");
    assert!(err.to_string().contains("needs CUDA tensors"), "{err}");
}

/// Malformed calls are errors on any machine (checked before the device): a 3-D q, a block
/// size past i32, RMSNorm's shape and eps.
#[test]
fn malformed_calls_are_errors_before_the_device_is_asked() {
    let q3 = Tensor::zeros([1, 4, 64], (Kind::BFloat16, Device::Cpu));
    let err = attention::fused_forward(&q3, &q3, &q3, &AttentionMask::default(), 0.1)
        .err()
        .expect("3-D q");
    assert!(err.to_string().contains("expected q (B,H,Sq,D)"), "{err}");
    let q = Tensor::zeros([1, 1, 4, 64], (Kind::BFloat16, Device::Cpu));
    let blocks = Tensor::ones([1, 4, 1], (Kind::Bool, Device::Cpu));
    let mask = AttentionMask {
        block_mask: Some((&blocks, 1 << 32)),
        ..Default::default()
    };
    let err = attention::fused_forward(&q, &q, &q, &mask, 0.1)
        .err()
        .expect("a block size past i32");
    assert!(
        err.to_string().contains("block size must be in 1..2^31"),
        "{err}"
    );
    let x = Tensor::zeros([2, 12], (Kind::BFloat16, Device::Cpu));
    let w = Tensor::ones([12], (Kind::BFloat16, Device::Cpu));
    let err = rmsnorm::fused_forward(&x, &w, 1e-5).expect_err("C % 8 != 0");
    assert!(err.to_string().contains("C % 8 == 0"), "{err}");
    let x = Tensor::zeros([2, 8], (Kind::BFloat16, Device::Cpu));
    let err = rmsnorm::fused_forward(&x, &w.narrow(0, 0, 8), f64::NAN).expect_err("NaN eps");
    assert!(err.to_string().contains("eps must be finite"), "{err}");
}

#[test]
fn unsupported_head_dim_is_an_error_not_a_panic() {
    let q = Tensor::randn([1, 1, 4, 96], (Kind::BFloat16, Device::Cpu));
    let err = attention::fused_forward(&q, &q, &q, &AttentionMask::default(), 0.1)
        .err()
        .expect("d=96 unsupported");
    assert!(err.to_string().contains("head dims 64, 80, 128"), "{err}");
}

/// Shapes past CUDA's grid limits (batch or heads > 65535) are refused by name, not launched
/// with a wrapped grid size.
#[test]
fn shapes_past_the_grid_limits_are_an_error() {
    let q = Tensor::zeros([1, 1, 1, 64], (Kind::BFloat16, Device::Cpu));
    for shape in [[65_536, 1, 1, 64], [1, 65_536, 1, 64]] {
        let big = q.expand(shape, false);
        let err = attention::fused_forward(&big, &big, &big, &AttentionMask::default(), 0.1)
            .err()
            .expect("past the grid limits");
        assert!(err.to_string().contains("CUDA's grid limits"), "{err}");
    }
}

#[test]
fn nvrtc_compiles_rmsnorm_and_cache_keys_differ_by_arch() {
    let src = kernels::source("rmsnorm.cu").unwrap();
    let ptx = compile::compile_ptx(&src, "compute_80").expect("NVRTC from the torch wheel");
    assert!(ptx.contains(".entry rmsnorm_fwd_bf16"));
    let v = compile::nvrtc_version().unwrap();
    assert_ne!(
        compile::cache_key(&src, "compute_80", v),
        compile::cache_key(&src, "compute_90", v)
    );
}

#[test]
fn nvrtc_reports_errors_with_the_log() {
    let bad = kernels::KernelSource {
        name: "bad.cu",
        text: "extern \"C\" __global__ void k() { int x = ; }".into(),
    };
    let err = compile::compile_ptx(&bad, "compute_80").expect_err("syntax error");
    let msg = err.to_string();
    assert!(msg.contains("bad.cu") && msg.contains("error"), "{msg}");
}
