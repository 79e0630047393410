// dsrun CPU optimizer kernels: a plain C ABI over raw pointers (no Python or torch headers),
// so setuptools builds it without torch and Python loads it with ctypes (kernels/loader.py).
//
// [Note: run-time SIMD dispatch] The library is compiled for the baseline x86-64 ISA; the
// optimizer bodies (cpu_kernels.h) are compiled three times: AVX-512 (F/BW/VL/DQ), AVX2+FMA+F16C
// and scalar, each under its own `#pragma GCC target`. The first call picks the best level the
// running CPU supports (__builtin_cpu_supports), so one binary is right for every x86 node and
// never needs `-march=native` at build time (DeepSpeed #7556). dsrun_set_simd_level() lets tests
// exercise each path on one machine.
//
// Threads: OpenMP over 64Ki-element chunks, scheduled dynamically (see run_parallel); the step is
// bandwidth bound (28 B/param for fp32 Adam).
#include <cmath>
#include <cstdint>
#include <cstdlib>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

enum { DT_NONE = -1, DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { SIMD_SCALAR = 0, SIMD_AVX2 = 1, SIMD_AVX512 = 2 };
#define DSRUN_ABI_VERSION 1

struct AdamArgs {
    void* param;
    const void* grad;
    float* exp_avg;
    float* exp_avg_sq;
    void* out;
    int out_nt;  // stream `out` with non-temporal stores (large, 64-byte aligned)
    float one_minus_beta1, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, inv_bc2_sqrt, eps, decay, weight_decay;
    int adamw_mode;
};
struct AdagradArgs {
    void* param;
    const void* grad;
    float* state_sum;
    void* out;
    int out_nt;
    float lr, eps, weight_decay;
};

namespace isa_scalar {
using V = dsrun_simd::Scalar;
#include "cpu_kernels.h"
}  // namespace isa_scalar

#ifdef DSRUN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
DSRUN_AVX2_STRUCT
using V = Avx2;
#include "cpu_kernels.h"
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace isa_avx512 {
DSRUN_AVX512_STRUCT
using V = Avx512;
#include "cpu_kernels.h"
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

static int detect_simd_level() {
#ifdef DSRUN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return SIMD_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return SIMD_AVX2;
#endif
    return SIMD_SCALAR;
}

static int g_level = -1;
static int g_max_level = -1;

static int simd_level() {
    if (g_level < 0) {
        g_max_level = detect_simd_level();
        g_level = g_max_level;
    }
    return g_level;
}

// Work is split into chunks of kChunk elements (a multiple of 64: whole cache lines for every array,
// no false sharing) handed out dynamically, so a thread that loses its core to another process (the
// CI box is shared) does not hold up the step: the others take its remaining chunks.
static const int64_t kChunk = 1 << 16;

template <class Args, class Fn>
static void run_parallel(Fn fn, const Args& a, int64_t n, int num_threads) {
#ifdef _OPENMP
    int64_t chunks = (n + kChunk - 1) / kChunk;
    int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
    if (chunks < nt) nt = (int)chunks;
    if (nt > 1) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t b = c * kChunk, e = b + kChunk < n ? b + kChunk : n;
            fn(a, b, e);
        }
        return;
    }
#endif
    fn(a, 0, n);
}

// Non-temporal copy-out pays off once the output no longer fits in cache; chunks start on 64-element
// boundaries, so a 64-byte-aligned base keeps every vector store aligned.
static int use_nt(const void* out, int64_t n) {
    return out != nullptr && n >= (int64_t(1) << 20) && (reinterpret_cast<uintptr_t>(out) & 63) == 0;
}

static bool valid_dtypes(int p, int g, int o) {
    return p >= 0 && p <= 2 && g >= 0 && g <= 2 && o >= -1 && o <= 2;
}

extern "C" {

#ifndef DSRUN_SOURCE_HASH
#define DSRUN_SOURCE_HASH "unknown"
#endif
#define DSRUN_API __attribute__((visibility("default")))

DSRUN_API int dsrun_abi_version(void) { return DSRUN_ABI_VERSION; }

// Hash of the sources this library was built from (kernels/build_ext.py::source_hash).
DSRUN_API const char* dsrun_source_hash(void) { return DSRUN_SOURCE_HASH; }

// 0 scalar, 1 AVX2, 2 AVX-512: the level in use.
DSRUN_API int dsrun_simd_level(void) { return simd_level(); }

// Force a level (for tests); capped at what the CPU supports. Returns the level now in use.
DSRUN_API int dsrun_set_simd_level(int level) {
    simd_level();
    g_level = level < 0 || level > g_max_level ? g_max_level : level;
    return g_level;
}

DSRUN_API int dsrun_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// One Adam/AdamW step over n elements. param: p_dtype (0 fp32, 1 fp16, 2 bf16), updated in place;
// grad: g_dtype; exp_avg, exp_avg_sq: fp32, updated in place; out: optional (out_dtype -1 = none)
// copy of the updated param in out_dtype. bias_correction1/2 = 1 - beta^step (1 when disabled).
// Returns 0, or -1 for an unsupported dtype code.
DSRUN_API int dsrun_adam_step(void* param, int p_dtype, const void* grad, int g_dtype, float* exp_avg,
                    float* exp_avg_sq, void* out, int out_dtype, int64_t n, double lr, double beta1,
                    double beta2, double eps, double weight_decay, double bias_correction1,
                    double bias_correction2, int adamw_mode, int num_threads) {
    if (!valid_dtypes(p_dtype, g_dtype, out_dtype) || n < 0) return -1;
    if (out == nullptr) out_dtype = DT_NONE;
    AdamArgs a;
    a.param = param;
    a.grad = grad;
    a.exp_avg = exp_avg;
    a.exp_avg_sq = exp_avg_sq;
    a.out = out;
    a.out_nt = use_nt(out, n);
    a.one_minus_beta1 = (float)(1.0 - beta1);
    a.beta2 = (float)beta2;
    a.one_minus_beta2 = (float)(1.0 - beta2);
    a.neg_step_size = (float)(-(lr / bias_correction1));
    a.bc2_sqrt = (float)std::sqrt(bias_correction2);
    a.inv_bc2_sqrt = 1.0f / a.bc2_sqrt;
    a.eps = (float)eps;
    a.decay = (float)(1.0 - lr * weight_decay);
    a.weight_decay = (float)weight_decay;
    a.adamw_mode = adamw_mode;
    int o = out_dtype + 1;
    switch (simd_level()) {
#ifdef DSRUN_X86
        case SIMD_AVX512: run_parallel(isa_avx512::adam_table[p_dtype][g_dtype][o], a, n, num_threads); break;
        case SIMD_AVX2: run_parallel(isa_avx2::adam_table[p_dtype][g_dtype][o], a, n, num_threads); break;
#endif
        default: run_parallel(isa_scalar::adam_table[p_dtype][g_dtype][o], a, n, num_threads);
    }
    return 0;
}

// One Adagrad step (torch.optim.Adagrad, lr_decay 0, initial_accumulator_value in state_sum).
DSRUN_API int dsrun_adagrad_step(void* param, int p_dtype, const void* grad, int g_dtype, float* state_sum,
                       void* out, int out_dtype, int64_t n, double lr, double eps,
                       double weight_decay, int num_threads) {
    if (!valid_dtypes(p_dtype, g_dtype, out_dtype) || n < 0) return -1;
    if (out == nullptr) out_dtype = DT_NONE;
    AdagradArgs a;
    a.param = param;
    a.grad = grad;
    a.state_sum = state_sum;
    a.out = out;
    a.out_nt = use_nt(out, n);
    a.lr = (float)lr;
    a.eps = (float)eps;
    a.weight_decay = (float)weight_decay;
    int o = out_dtype + 1;
    switch (simd_level()) {
#ifdef DSRUN_X86
        case SIMD_AVX512: run_parallel(isa_avx512::adagrad_table[p_dtype][g_dtype][o], a, n, num_threads); break;
        case SIMD_AVX2: run_parallel(isa_avx2::adagrad_table[p_dtype][g_dtype][o], a, n, num_threads); break;
#endif
        default: run_parallel(isa_scalar::adagrad_table[p_dtype][g_dtype][o], a, n, num_threads);
    }
    return 0;
}

}  // extern "C"
