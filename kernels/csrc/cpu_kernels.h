// Optimizer bodies over a range [begin, end), written once against the vector interface of
// simd.h. cpu_ops.cpp includes this file once per instruction set, inside a namespace that
// defines `V` (the vector ops) and under a matching `#pragma GCC target`, so every helper
// inlines into the ISA's own code. No include guard on purpose.
//
// [Note: Adam arithmetic order] The update mirrors torch's fused CPU AdamW kernel
// (aten/src/ATen/native/cpu/FusedAdamKernel.cpp) so that fp32 results agree to a few ulps:
//   grad += wd * param                      (Adam, L2 mode)      or
//   param *= 1 - lr * wd                    (AdamW, decoupled)
//   m = fma(1 - b1, grad - m, m)            (lerp with weight < 0.5)
//   v = v * b2 + (1 - b2) * grad * grad
//   param += (-step_size * m) / (sqrt(v) / sqrt(bc2) + eps),  step_size = lr / bc1
// Scalars are formed in double on the host side of the call and rounded to float once.
//
// [Note: Adam update without dividers] torch's order costs two divides and a square root per
// vector, and the divider bounds one core's pace (AVX-512, data in L1: 16 cycles per 16 params,
// against 5 for the same loads and stores with trivial arithmetic). The divide by the constant
// sqrt(bc2) becomes V::div_const: a multiply by its precomputed reciprocal plus one fma residual
// correction, which rounds like the divide (13 cycles per 16 params). The results stay bitwise
// torch's (checked over 4Mi params x 10 steps, grads spread over e^+-9). A reciprocal estimate
// with a Newton step for the other divide would save 3 more cycles but differs from torch by an
// ulp of the update; correcting it exactly cost more than the divider (22 cycles). The step is
// memory bound on most machines, but a core that computes faster keeps more loads in flight,
// which counts when a few cores must pull the whole machine's bandwidth.

template <int DT>
static inline typename V::F load_as_f32(const void* base, int64_t i) {
    if constexpr (DT == DT_F32) return V::load(static_cast<const float*>(base) + i);
    else if constexpr (DT == DT_BF16) return V::load_bf16(static_cast<const uint16_t*>(base) + i);
    else return V::load_fp16(static_cast<const uint16_t*>(base) + i);
}
template <int DT>
static inline float load1(const void* base, int64_t i) {
    if constexpr (DT == DT_F32) return static_cast<const float*>(base)[i];
    else if constexpr (DT == DT_BF16) return dsrun_simd::bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    else return dsrun_simd::fp16_to_f32(static_cast<const uint16_t*>(base)[i]);
}
template <int DT>
static inline void store_from_f32(void* base, int64_t i, typename V::F x) {
    if constexpr (DT == DT_F32) V::store(static_cast<float*>(base) + i, x);
    else if constexpr (DT == DT_BF16) V::store_bf16(static_cast<uint16_t*>(base) + i, x);
    else if constexpr (DT == DT_F16) V::store_fp16(static_cast<uint16_t*>(base) + i, x);
}
// Non-temporal store for write-only outputs: skips the read-for-ownership of the destination line,
// so a 16-bit copy-out costs 2 B/param of traffic instead of 4. Needs a vector-aligned address.
template <int DT>
static inline void store_nt_from_f32(void* base, int64_t i, typename V::F x) {
    if constexpr (DT == DT_F32) V::store_nt(static_cast<float*>(base) + i, x);
    else if constexpr (DT == DT_BF16) V::store_bf16_nt(static_cast<uint16_t*>(base) + i, x);
    else if constexpr (DT == DT_F16) V::store_fp16_nt(static_cast<uint16_t*>(base) + i, x);
}
template <int DT>
static inline void store1(void* base, int64_t i, float x) {
    if constexpr (DT == DT_F32) static_cast<float*>(base)[i] = x;
    else if constexpr (DT == DT_BF16) static_cast<uint16_t*>(base)[i] = dsrun_simd::f32_to_bf16(x);
    else if constexpr (DT == DT_F16) static_cast<uint16_t*>(base)[i] = dsrun_simd::f32_to_fp16(x);
}

template <int PT, int GT, int OT>
static void adam_range(const AdamArgs& a, int64_t begin, int64_t end) {
    using F = typename V::F;
    constexpr int W = V::W;
    const F b1c = V::set1(a.one_minus_beta1), b2 = V::set1(a.beta2), b2c = V::set1(a.one_minus_beta2);
    const F neg_step = V::set1(a.neg_step_size), bc2_sqrt = V::set1(a.bc2_sqrt), eps = V::set1(a.eps);
    const F inv_bc2_sqrt = V::set1(a.inv_bc2_sqrt);
    const F decay = V::set1(a.decay), wd = V::set1(a.weight_decay);
    float* m = a.exp_avg;
    float* v = a.exp_avg_sq;
    int64_t i = begin;
    for (; i + W <= end; i += W) {
        F g = load_as_f32<GT>(a.grad, i);
        F p = load_as_f32<PT>(a.param, i);
        if (a.weight_decay != 0.0f) {
            if (a.adamw_mode) p = V::mul(p, decay);
            else g = V::fmadd(p, wd, g);
        }
        F mv = V::load(m + i);
        mv = V::fmadd(b1c, V::sub(g, mv), mv);
        F vv = V::add(V::mul(V::load(v + i), b2), V::mul(V::mul(b2c, g), g));
        F denom = V::add(V::div_const(V::sqrt(vv), bc2_sqrt, inv_bc2_sqrt), eps);
        p = V::add(p, V::div(V::mul(neg_step, mv), denom));
        V::store(m + i, mv);
        V::store(v + i, vv);
        store_from_f32<PT>(a.param, i, p);
        if constexpr (OT != DT_NONE) {
            if (a.out_nt) store_nt_from_f32<OT>(a.out, i, p);
            else store_from_f32<OT>(a.out, i, p);
        }
    }
    if constexpr (OT != DT_NONE) {
        if (a.out_nt) V::fence();
    }
    for (; i < end; ++i) {  // tail: same arithmetic, one lane
        float g = load1<GT>(a.grad, i), p = load1<PT>(a.param, i);
        if (a.weight_decay != 0.0f) {
            if (a.adamw_mode) p = p * a.decay;
            else g = std::fma(p, a.weight_decay, g);
        }
        float mv = std::fma(a.one_minus_beta1, g - m[i], m[i]);
        float vv = v[i] * a.beta2 + (a.one_minus_beta2 * g) * g;
        float denom = std::sqrt(vv) / a.bc2_sqrt + a.eps;
        p = p + (a.neg_step_size * mv) / denom;
        m[i] = mv;
        v[i] = vv;
        store1<PT>(a.param, i, p);
        if constexpr (OT != DT_NONE) store1<OT>(a.out, i, p);
    }
}

// Adagrad (torch.optim.Adagrad with lr_decay=0): sum += g*g; p -= lr * g / (sqrt(sum) + eps).
template <int PT, int GT, int OT>
static void adagrad_range(const AdagradArgs& a, int64_t begin, int64_t end) {
    using F = typename V::F;
    constexpr int W = V::W;
    const F neg_lr = V::set1(-a.lr), eps = V::set1(a.eps), wd = V::set1(a.weight_decay);
    float* s = a.state_sum;
    int64_t i = begin;
    for (; i + W <= end; i += W) {
        F g = load_as_f32<GT>(a.grad, i);
        F p = load_as_f32<PT>(a.param, i);
        if (a.weight_decay != 0.0f) g = V::fmadd(p, wd, g);
        F sv = V::fmadd(g, g, V::load(s + i));
        F stdv = V::add(V::sqrt(sv), eps);
        p = V::add(p, V::mul(neg_lr, V::div(g, stdv)));
        V::store(s + i, sv);
        store_from_f32<PT>(a.param, i, p);
        if constexpr (OT != DT_NONE) store_from_f32<OT>(a.out, i, p);
    }
    for (; i < end; ++i) {
        float g = load1<GT>(a.grad, i), p = load1<PT>(a.param, i);
        if (a.weight_decay != 0.0f) g = std::fma(p, a.weight_decay, g);
        float sv = std::fma(g, g, s[i]);
        p = p + (-a.lr) * (g / (std::sqrt(sv) + a.eps));
        s[i] = sv;
        store1<PT>(a.param, i, p);
        if constexpr (OT != DT_NONE) store1<OT>(a.out, i, p);
    }
}

// Dispatch tables: [param dtype][grad dtype][out dtype] -> instantiation.
using AdamFn = void (*)(const AdamArgs&, int64_t, int64_t);
using AdagradFn = void (*)(const AdagradArgs&, int64_t, int64_t);
#define DSRUN_ROW(FN, P, G) {&FN<P, G, DT_NONE>, &FN<P, G, DT_F32>, &FN<P, G, DT_F16>, &FN<P, G, DT_BF16>}
#define DSRUN_TABLE(FN)                                                                        \
    {{DSRUN_ROW(FN, DT_F32, DT_F32), DSRUN_ROW(FN, DT_F32, DT_F16), DSRUN_ROW(FN, DT_F32, DT_BF16)}, \
     {DSRUN_ROW(FN, DT_F16, DT_F32), DSRUN_ROW(FN, DT_F16, DT_F16), DSRUN_ROW(FN, DT_F16, DT_BF16)}, \
     {DSRUN_ROW(FN, DT_BF16, DT_F32), DSRUN_ROW(FN, DT_BF16, DT_F16), DSRUN_ROW(FN, DT_BF16, DT_BF16)}}
static const AdamFn adam_table[3][3][4] = DSRUN_TABLE(adam_range);
static const AdagradFn adagrad_table[3][3][4] = DSRUN_TABLE(adagrad_range);
#undef DSRUN_TABLE
#undef DSRUN_ROW
