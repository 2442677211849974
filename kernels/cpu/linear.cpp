// A float32 linear layer (y = x W^T + b) for CPUs with AVX-512, weights as nn.Linear stores them.
//
// MKL's sgemm runs at ~90 GFLOP/s on this machine's AMD cores whatever the shape, and at a third of
// that for the few rows of a decode step (it packs and blocks as if for thousands of rows), while
// the core does ~200. This kernel takes 4 weight rows at a time straight from their layout (no
// packed copy, no extra memory) and dots them with up to 6 input rows at once, 16 floats per
// instruction along K: 24 accumulators in registers, each weight vector loaded once per 6 input
// rows, each input vector once per 4 weight rows. Input rows go in passes of 96, so that a pass
// stays in L2 while every weight row streams past it once; a decode step is one pass, so its
// weights are read from memory exactly once. Measured here (docs/engine.md): 1.4x-2.9x MKL from
// 1 to 4096 rows.
//
// The sums are taken in another order than MKL's, so outputs differ from F.linear in the last
// bits (relative ~1e-7), as MKL's own do between batch sizes; greedy output is held equal to
// transformers by the fidelity tests, as for every other batching.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)

constexpr int kRows = 6;     // input rows per tile (MR)
constexpr int kCols = 4;     // weight rows per tile (NR): 6 x 4 accumulators + 4 + 1 vectors < 32 registers
constexpr int64_t kPass = 96;  // input rows per pass over the weights (a multiple of kRows)
constexpr int64_t kAhead = 2;  // tiles of weight rows prefetched (into L2) ahead of the first input rows

template <int MR, int NR>
inline void tile(const float* x, const float* w, float* out, int64_t K, int64_t N, const float* bias, bool fetch) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      if (fetch) _mm_prefetch(reinterpret_cast<const char*>(w + (kAhead * kCols + j) * K + k), _MM_HINT_T1);
      wv[j] = _mm512_loadu_ps(w + j * K + k);
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * K + k);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i * N + j] = _mm512_reduce_add_ps(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

// Every input row against NR weight rows (columns of the output); the first tile of input rows
// prefetches the weight rows kAhead tiles on, the others find theirs in cache.
template <int NR>
void columns(const float* x, int64_t M, int64_t K, const float* w, float* out, int64_t N, const float* bias,
             bool fetch) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows, fetch = false) tile<kRows, NR>(x + m * K, w, out + m * N, K, N, bias, fetch);
  switch (M - m) {
    case 1: tile<1, NR>(x + m * K, w, out + m * N, K, N, bias, fetch); break;
    case 2: tile<2, NR>(x + m * K, w, out + m * N, K, N, bias, fetch); break;
    case 3: tile<3, NR>(x + m * K, w, out + m * N, K, N, bias, fetch); break;
    case 4: tile<4, NR>(x + m * K, w, out + m * N, K, N, bias, fetch); break;
    case 5: tile<5, NR>(x + m * K, w, out + m * N, K, N, bias, fetch); break;
    default: break;
  }
}

void pass(const float* x, const float* w, const float* bias, float* out, int64_t M, int64_t K, int64_t N) {
  const int64_t tiles = (N + kCols - 1) / kCols;
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * kCols;
      const float* wt = w + n * K;
      const float* bt = bias ? bias + n : nullptr;
      const bool fetch = (t + kAhead + 1) * kCols <= N;  // never past the matrix's last row
      switch (std::min<int64_t>(kCols, N - n)) {
        case 4: columns<4>(x, M, K, wt, out + n, N, bt, fetch); break;
        case 3: columns<3>(x, M, K, wt, out + n, N, bt, fetch); break;
        case 2: columns<2>(x, M, K, wt, out + n, N, bt, fetch); break;
        default: columns<1>(x, M, K, wt, out + n, N, bt, fetch); break;
      }
    }
  });
}

void run(const float* x, const float* w, const float* bias, float* out, int64_t M, int64_t K, int64_t N) {
  for (int64_t m = 0; m < M; m += kPass) pass(x + m * K, w, bias, out + m * N, std::min(kPass, M - m), K, N);
}

#endif  // __AVX512F__

bool linear_native() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "linear: x [M, K] and weight [N, K] expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "linear: float32 only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "linear: contiguous x and weight expected");
  const bool with_bias = bias.has_value() && bias->defined();
  if (with_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat,
                "linear: bias [N] float32 expected");
#if defined(__AVX512F__)
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  run(x.data_ptr<float>(), weight.data_ptr<float>(), with_bias ? bias->data_ptr<float>() : nullptr,
      out.data_ptr<float>(), x.size(0), x.size(1), weight.size(0));
  return out;
#else
  return at::linear(x, weight, with_bias ? *bias : at::Tensor());
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adrenaline_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_native() -> bool", &linear_native);  // no tensors: one kernel for all
}

TORCH_LIBRARY_IMPL(adrenaline_cpu, CPU, m) { m.impl("linear", &linear); }
