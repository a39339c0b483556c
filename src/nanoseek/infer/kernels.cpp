// Decode-time kernels: DeepSeekMoE's routed experts, Linear layers and MLA's absorbed attention, the CPU
// implementations of the torch ops `nanoseek_cpu::routed_experts(_int8)`, `nanoseek_cpu::linear_panels` and
// `nanoseek_cpu::latent_attention` (infer/kernels.py defines them, and
// builds this file with the machine's C++ compiler and torch's headers on first use).
//
// At a few tokens per step the routed experts are mat-vecs whose time is the time to read the chosen experts'
// weights. Inductor's fused kernel for the compiled step reads an expert once per (token, expert) pair, each
// output one dependent chain of FMAs; at 16 tokens that is ~2.3 reads of every chosen expert. Here the pairs are
// grouped by expert, each weight row is read once for all the tokens that chose it, R x M independent
// accumulators hide the FMA latency, and a prefetch a few rows ahead keeps enough cache-line reads in flight to
// stream (docs/LOG.md, 2026-11-29: figures against inductor's kernel and the model's grouped GEMMs).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

// A tile keeps R x MT accumulators of V floats, plus MT vectors of x and one of w, in registers. AVX-512 has 32 of
// 16 floats; AVX2 has 16 of 8 floats, where 4 x 4 vectors of 16 floats (32 registers) spilled and made the compiled
// batch-16 step 18% slower than inductor's kernel (docs/LOG.md, 2026-11-30); NEON has 32 of 4 floats.
#if defined(__AVX512F__)
constexpr int64_t V = 16;
constexpr int MT = 4;            // vectors of x per tile: 16 accumulators + 4 + 1 of 32 registers
#else
constexpr int64_t V = 8;
constexpr int MT = 2;            // 8 accumulators + 2 + 1 of AVX2's 16 registers (two each on NEON: 22 of 32)
#endif
typedef float vec __attribute__((vector_size(V * sizeof(float))));
constexpr int64_t R = 4;         // weight rows per tile
constexpr int64_t AHEAD = 8;     // prefetch distance in rows (best of none / 8 / 16 measured, docs/LOG.md)

static inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// bfloat16 weights (stored as their 16 bits): a bf16 is the upper half of a float32, so widening is exact.
// Half the bytes of float32 to read, and reading is what a decode step's experts cost.
static inline vec load(const uint16_t* p) {
  typedef uint16_t bits16 __attribute__((vector_size(V * sizeof(uint16_t))));
  typedef uint32_t bits32 __attribute__((vector_size(V * sizeof(uint32_t))));
  bits16 h;
  std::memcpy(&h, p, sizeof h);
  const bits32 u = __builtin_convertvector(h, bits32) << 16;
  vec v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// int8 weights (`--expert-dtype int8`, infer/quant.py): widened exactly to float32; the row's scale multiplies the
// finished dot product (the caller's job), since W·x = s ⊙ (Q·x) with one scale per row.
// gcc 12 compiles __builtin_convertvector from 8-bit integers to floats one element at a time (8 scalar
// conversions), which made int8 slower than float32; the x86 intrinsics are one sign-extending load and one
// conversion.
static inline vec load(const int8_t* p) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  typedef int8_t bytes __attribute__((vector_size(V)));
  bytes b;
  std::memcpy(&b, p, sizeof b);
  const vec f = __builtin_convertvector(b, vec);
#endif
  vec v;
  std::memcpy(&v, &f, sizeof v);
  return v;
}

typedef float quarter __attribute__((vector_size(4 * sizeof(float))));

static inline quarter fold4(vec v) {  // V floats -> 4 partial sums (halves by memcpy: gcc < 12 has no shufflevector)
  float a[V];
  std::memcpy(a, &v, sizeof v);
  quarter lo, hi;
  if constexpr (V == 16) {
    typedef float half __attribute__((vector_size(8 * sizeof(float))));
    half x, y;
    std::memcpy(&x, a, sizeof x);
    std::memcpy(&y, a + 8, sizeof y);
    x += y;
    std::memcpy(&lo, &x, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof lo, sizeof hi);
  } else {
    std::memcpy(&lo, a, sizeof lo);
    std::memcpy(&hi, a + 4, sizeof hi);
  }
  return lo + hi;
}

// [Σa, Σb, Σc, Σd]: four horizontal sums at once (a 4 x 4 transpose-add, which gcc compiles to unpack/shuffle
// instructions), stored by the caller as one vector.
static inline quarter hsum4(vec a, vec b, vec c, vec d) {
  const quarter a4 = fold4(a), b4 = fold4(b), c4 = fold4(c), d4 = fold4(d);
  const quarter ab = quarter{a4[0], b4[0], a4[1], b4[1]} + quarter{a4[2], b4[2], a4[3], b4[3]};
  const quarter cd = quarter{c4[0], d4[0], c4[1], d4[1]} + quarter{c4[2], d4[2], c4[3], d4[3]};
  return quarter{ab[0], ab[1], cd[0], cd[1]} + quarter{ab[2], ab[3], cd[2], cd[3]};
}

constexpr int64_t LINE = 64 / sizeof(float);  // floats per cache line: one prefetch per row and line
static_assert(R == 4 && LINE % V == 0, "a tile's R = 4 sums per vector of x are stored as one vector of 4");

// out[j * ldo + r] = w[r]·x[j] for the R rows of w at w (row stride ldw) and M vectors x[j] of length n (a multiple
// of LINE). noinline: inlined into its caller, gcc 12 kept the accumulators on the stack (a store-load chain per
// FMA); the accumulators start as zeros in registers (`= {}` on the array made gcc call memset on a stack copy).
template <int M, typename W>
__attribute__((noinline)) static void tile(const W* w, int64_t ldw, const float* const* x, int64_t n, float* out,
                                           int64_t ldo) {
  vec acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < M; ++j) acc[r][j] = vec{};
  for (int64_t i = 0; i < n; i += LINE) {
    for (int r = 0; r < R; ++r) __builtin_prefetch(w + (r + AHEAD) * ldw + i);
    for (int64_t v = i; v < i + LINE; v += V) {
      vec xv[M];
      for (int j = 0; j < M; ++j) xv[j] = load(x[j] + v);
      for (int r = 0; r < R; ++r) {
        const vec wv = load(w + r * ldw + v);
        for (int j = 0; j < M; ++j) acc[r][j] += wv * xv[j];
      }
    }
  }
  for (int j = 0; j < M; ++j) {
    const quarter sums = hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
    std::memcpy(out + j * ldo, &sums, sizeof sums);
  }
}

// One vector x: rows one after another (a single sequential stream for the prefetcher), 4 chains per row.
template <typename W>
__attribute__((noinline)) static void rows_one(const W* w, int64_t ldw, int64_t rows, const float* x, int64_t n,
                                               float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const W* row = w + r * ldw;
    vec a0 = vec{}, a1 = vec{}, a2 = vec{}, a3 = vec{};
    int64_t i = 0;
    for (; i + 4 * V <= n; i += 4 * V) {
      a0 += load(row + i) * load(x + i);
      a1 += load(row + i + V) * load(x + i + V);
      a2 += load(row + i + 2 * V) * load(x + i + 2 * V);
      a3 += load(row + i + 3 * V) * load(x + i + 3 * V);
    }
    for (; i < n; i += V) a0 += load(row + i) * load(x + i);
    const quarter s = fold4((a0 + a1) + (a2 + a3));
    out[r] = (s[0] + s[2]) + (s[1] + s[3]);
  }
}

// bfloat16 products (`--matmul-dtype bf16`): on a CPU with AVX512-BF16, `vdpbf16ps` multiplies 32 pairs of
// bf16 numbers and adds each lane's two products into a float32 sum, one instruction where float32 weights take
// two FMAs and int8 or bf16 ones a widening as well; the weights are half float32's bytes. Both operands must be
// bf16: the activations are rounded once per call (round_bf16), the sums stay float32, as a GPU's bf16 matmul does.
// Elsewhere the same products are computed by widening both (exactly) to float32: slower, and equal up to the
// float32 rounding of sums taken in another order.

// float32 -> bfloat16 bits, rounded to nearest even (a NaN stays a NaN), as torch's .to(torch.bfloat16); with
// AVX512-BF16, a denormal float becomes a signed zero, as the vector conversion makes it (and `vdpbf16ps` reads
// denormal bf16 numbers as zeros): the tail of a row must round as the rest of it does.
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t(u >> 16 | 0x40);
#if defined(__AVX512BF16__)
  if ((u & 0x7f800000u) == 0) return uint16_t(u >> 16 & 0x8000);
#endif
  return uint16_t((u + 0x7fffu + (u >> 16 & 1)) >> 16);
}

static void round_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 32 <= n; i += 32)  // to nearest even, denormals to zero
    _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) out[i] = to_bf16(x[i]);
}

#if defined(__AVX512BF16__)
constexpr int64_t BV = 32;  // bf16 numbers per vector (one cache line)

static inline __m512bh load_bh(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
#endif

// out[j*ldo + r] = w[r]·x[j] for rows r in [r0, r1) of w (whole tiles) and m vectors x[j] of length n.
// Rows outer, vectors inner: a tile of rows is read from memory once and from L1 for the other vectors.
template <typename W>
static void rows_times(const W* w, int64_t ldw, int64_t r0, int64_t r1, const float* const* x, int64_t m,
                       int64_t n, float* out, int64_t ldo) {
  if (m == 1) return rows_one<W>(w + r0 * ldw, ldw, r1 - r0, x[0], n, out + r0);
  for (int64_t r = r0; r < r1; r += R) {
    for (int64_t j0 = 0; j0 < m; j0 += MT) {
      const int64_t mm = std::min<int64_t>(m - j0, MT);
      float* o = out + j0 * ldo + r;
      if constexpr (MT == 4) {
        if (mm == 3) tile<3, W>(w + r * ldw, ldw, x + j0, n, o, ldo);
        else if (mm == 4) tile<4, W>(w + r * ldw, ldw, x + j0, n, o, ldo);
      }
      if (mm == 1) tile<1, W>(w + r * ldw, ldw, x + j0, n, o, ldo);
      else if (mm == 2) tile<2, W>(w + r * ldw, ldw, x + j0, n, o, ldo);
    }
  }
}

// Split `rows` rows (a multiple of R) in tiles over torch's threads, `row_bytes` of weights per row (all matrices
// together); a thread's share is at least ~128 KB of weights: less is not worth waking a second thread for.
template <typename F>
static void over_rows(int64_t rows, int64_t row_bytes, const F& body) {
  const int64_t grain = std::max<int64_t>(1, 131072 / (R * row_bytes));
  at::parallel_for(0, rows / R, grain, [&](int64_t t0, int64_t t1) { body(t0 * R, t1 * R); });
}

enum class Weights { none, bf16, int8 };  // what a tensor holds: float32, float32 or bfloat16, int8

static void check(const at::Tensor& t, int64_t dim, const char* name, Weights kind) {
  const auto type = t.scalar_type();
  const bool ok = kind == Weights::int8 ? type == at::kChar
                                        : type == at::kFloat || (kind == Weights::bf16 && type == at::kBFloat16);
  TORCH_CHECK(t.device().is_cpu() && ok && t.dim() == dim && t.size(-1) % LINE == 0, name, ": expected a ", dim,
              kind == Weights::int8 ? "-d int8" : kind == Weights::bf16 ? "-d float32 or bfloat16" : "-d float32",
              " CPU tensor whose last size is a multiple of ", LINE);
}

typedef int32_t ivec __attribute__((vector_size(V * sizeof(int32_t))));

static inline vec select(ivec mask, vec a, vec b) {  // mask lanes -1: a, 0: b
  ivec ai, bi;
  std::memcpy(&ai, &a, sizeof a);
  std::memcpy(&bi, &b, sizeof b);
  const ivec r = (mask & ai) | (~mask & bi);
  vec v;
  std::memcpy(&v, &r, sizeof v);
  return v;
}

static inline vec splat(float x) { return vec{} + x; }

// e^x for x <= 0 (scores minus their row's maximum): Cephes' expf, a degree-5 polynomial on [-ln2/2, ln2/2] times
// 2^n built in the exponent bits; relative error ~1e-7. x < -87.3 (a masked key's -inf) gives exactly 0.
static inline vec exp_nonpositive(vec x) {
  const vec lo = splat(-87.3f);
  const ivec under = x < lo;
  x = select(under, lo, x);
  const vec y = x * 1.44269504088896341f + 0.5f;
  vec n = __builtin_convertvector(__builtin_convertvector(y, ivec), vec);  // toward zero, then down: floor
  n += __builtin_convertvector(n > y, vec);                                 // (true lanes are -1)
  const vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vec e = p * r * r + r + 1.0f;
  ivec bits;
  std::memcpy(&bits, &e, sizeof e);
  bits += __builtin_convertvector(n, ivec) << 23;  // n >= -126: a normal float
  vec out;
  std::memcpy(&out, &bits, sizeof out);
  return select(under, vec{}, out);
}

// m = silu(g)·u·w over I numbers (a multiple of V): σ(g) from t = e^(-|g|), which never overflows: 1 / (1 + t) for
// g >= 0, t / (1 + t) below. glibc's scalar expf here took ~40 µs of a 16-token layer's ~150, on one thread.
static void silu_times(const float* g, const float* u, float w, int64_t I, float* m) {
  for (int64_t i = 0; i < I; i += V) {
    const vec gv = load(g + i);
    const ivec negative = gv < 0;
    const vec t = exp_nonpositive(select(negative, gv, -gv));
    const vec out = gv * (select(negative, t, splat(1.0f)) / (1.0f + t)) * load(u + i) * w;
    std::memcpy(m + i, &out, sizeof out);
  }
}

// The (token, expert) pairs sorted by expert: pair[begin[e]:begin[e+1]] are the pairs that chose expert e.
struct Pairs {
  std::vector<int64_t> begin, pair;
  int64_t chosen = 0;  // distinct experts: how many matrices each row split covers
};

static Pairs sort_pairs(const int64_t* index, int64_t P, int64_t E) {
  Pairs s{std::vector<int64_t>(E + 1, 0), std::vector<int64_t>(P)};
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(index[p] >= 0 && index[p] < E, "routed_experts: expert index ", index[p], " out of range");
    ++s.begin[index[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) {
    s.chosen += s.begin[e + 1] > 0;
    s.begin[e + 1] += s.begin[e];
  }
  std::vector<int64_t> next(s.begin.begin(), s.begin.end() - 1);
  for (int64_t p = 0; p < P; ++p) s.pair[next[index[p]]++] = p;
  return s;
}

// Passes over the pairs (gathering rows, the hidden activations) split over the threads in shares of at least this
// many: at a prefill's thousands of pairs they were a third of the bf16 experts' time on one thread of two.
constexpr int64_t PAIRS = 256;

// mid[q] = silu(gate_q)·up_q times pair q's gate weight, for every pair q (gu: each pair's 2I outputs, gate then up).
// The gate weight comes before down_proj, which is linear: I wide, not H. Out = uint16_t: rounded to bf16 (the
// inputs of bf16 products).
template <typename Out>
static void hidden_of_pairs(const Pairs& s, const float* gate, const float* gu, int64_t I, Out* mid) {
  at::parallel_for(0, int64_t(s.pair.size()), PAIRS, [&](int64_t q0, int64_t q1) {
    std::vector<float> row(std::is_same_v<Out, float> ? 0 : I);
    for (int64_t q = q0; q < q1; ++q) {
      const float* g = gu + q * 2 * I;
      if constexpr (std::is_same_v<Out, float>) {
        silu_times(g, g + I, gate[s.pair[q]], I, mid + q * I);
      } else {
        silu_times(g, g + I, gate[s.pair[q]], I, row.data());
        round_bf16(row.data(), I, mid + q * I);
      }
    }
  });
}

// o[n][h0:h1] = the sum of token n's k rows y[q][h0:h1]: each thread its own columns, no write races.
static void sum_pairs(const Pairs& s, int64_t k, int64_t N, int64_t H, const float* y, int64_t h0, int64_t h1,
                      float* o) {
  for (int64_t n = 0; n < N; ++n) std::fill(o + n * H + h0, o + n * H + h1, 0.0f);
  for (size_t q = 0; q < s.pair.size(); ++q)
    for (int64_t h = h0; h < h1; ++h) o[s.pair[q] / k * H + h] += y[q * H + h];
}

// Rows [r0, r1) of the m outputs at out (row stride ldo) times their rows' scales s (none for float weights).
static void scale_rows(const float* s, int64_t r0, int64_t r1, int64_t m, float* out, int64_t ldo) {
  if (s == nullptr) return;
  for (int64_t j = 0; j < m; ++j)
    for (int64_t r = r0; r < r1; ++r) out[j * ldo + r] *= s[r];
}

// out [N, H] = Σ_j gate[n, j] · down_e(silu(gate_e x_n) · up_e x_n) over the sorted pairs; W: the weights' type,
// s_gu [E, 2I] and s_down [E, H] the rows' scales of int8 weights (nullptr otherwise).
template <typename W>
static void experts_for_pairs(const Pairs& s, const float* x, const float* gate, const W* w_gu, const W* w_down,
                              const float* s_gu, const float* s_down, int64_t N, int64_t k, int64_t E, int64_t H,
                              int64_t I, float* o) {
  const int64_t P = N * k;
  const std::vector<int64_t>& begin = s.begin;
  std::vector<const float*> xs(P), mids(P);
  std::vector<float> gu(P * 2 * I), mid(P * I), y(P * H);
  for (int64_t q = 0; q < P; ++q) {
    xs[q] = x + s.pair[q] / k * H;
    mids[q] = mid.data() + q * I;
  }
  // gate and up rows: each thread its share of every chosen expert
  over_rows(2 * I, H * s.chosen * int64_t(sizeof(W)), [&](int64_t r0, int64_t r1) {
    for (int64_t e = 0; e < E; ++e)
      if (begin[e + 1] > begin[e]) {
        rows_times(w_gu + e * 2 * I * H, H, r0, r1, xs.data() + begin[e], begin[e + 1] - begin[e], H,
                   gu.data() + begin[e] * 2 * I, 2 * I);
        scale_rows(s_gu ? s_gu + e * 2 * I : nullptr, r0, r1, begin[e + 1] - begin[e], gu.data() + begin[e] * 2 * I,
                   2 * I);
      }
  });
  hidden_of_pairs(s, gate, gu.data(), I, mid.data());
  over_rows(H, I * s.chosen * int64_t(sizeof(W)), [&](int64_t r0, int64_t r1) {
    for (int64_t e = 0; e < E; ++e)
      if (begin[e + 1] > begin[e]) {
        rows_times(w_down + e * H * I, I, r0, r1, mids.data() + begin[e], begin[e + 1] - begin[e], I,
                   y.data() + begin[e] * H, H);
        scale_rows(s_down ? s_down + e * H : nullptr, r0, r1, begin[e + 1] - begin[e], y.data() + begin[e] * H, H);
      }
    sum_pairs(s, k, N, H, y.data(), r0, r1, o);
  });
}

// DeepSeekMoE's routed experts for a few tokens: out[t] = Σ_j gate[t, j] · down_e(silu(gate_e x_t) · up_e x_t)
// with e = indices[t, j]. x [N, H] float32; indices, weights [N, k]; gate_up_proj [E, 2I, H] (gate rows, then up
// rows) and down_proj [E, H, I], both float32, both bfloat16 or both int8 with their rows' float32 scales
// gate_up_scale [E, 2I] and down_scale [E, H] (widened to float32: the math is float32 either way). Pairs are
// grouped by expert so that each chosen expert's weights are read once.
static at::Tensor experts_op(const at::Tensor& x_, const at::Tensor& indices_, const at::Tensor& weights_,
                             const at::Tensor& gate_up_, const at::Tensor& down_, const at::Tensor* gate_up_scale_,
                             const at::Tensor* down_scale_) {
  const bool int8 = gate_up_scale_ != nullptr;
  check(x_, 2, "x", Weights::none);
  check(gate_up_, 3, "gate_up_proj", int8 ? Weights::int8 : Weights::bf16);
  check(down_, 3, "down_proj", int8 ? Weights::int8 : Weights::bf16);
  TORCH_CHECK(gate_up_.scalar_type() == down_.scalar_type(), "routed_experts: gate_up_proj and down_proj must have ",
              "the same dtype");
  const at::Tensor x = x_.contiguous(), indices = indices_.to(at::kLong).contiguous(),
                   weights = weights_.to(at::kFloat).contiguous(), gate_up = gate_up_.contiguous(),
                   down = down_.contiguous();
  const int64_t N = x.size(0), k = indices.size(1), E = down.size(0), H = down.size(1), I = down.size(2), P = N * k;
  TORCH_CHECK(x.size(1) == H && gate_up.size(0) == E && gate_up.size(1) == 2 * I && gate_up.size(2) == H &&
              indices.size(0) == N && weights.sizes() == indices.sizes(), "routed_experts: mismatched shapes");
  at::Tensor s_gu, s_down;
  if (int8) {
    s_gu = gate_up_scale_->to(at::kFloat).contiguous();
    s_down = down_scale_->to(at::kFloat).contiguous();
    TORCH_CHECK(gate_up_scale_->device().is_cpu() && down_scale_->device().is_cpu() &&
                    s_gu.sizes() == gate_up.sizes().slice(0, 2) && s_down.sizes() == down.sizes().slice(0, 2),
                "routed_experts: scales must be CPU tensors [E, 2I] and [E, H]");
  }
  if (P == 0 || H == 0 || I == 0) return at::zeros({N, H}, x.options());
  const Pairs s = sort_pairs(indices.const_data_ptr<int64_t>(), P, E);
  at::Tensor out = at::empty({N, H}, x.options());
  const float *xp = x.const_data_ptr<float>(), *gate = weights.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  if (int8)
    experts_for_pairs(s, xp, gate, gate_up.const_data_ptr<int8_t>(), down.const_data_ptr<int8_t>(),
                      s_gu.const_data_ptr<float>(), s_down.const_data_ptr<float>(), N, k, E, H, I, o);
  else if (gate_up.scalar_type() == at::kBFloat16)
    experts_for_pairs(s, xp, gate, reinterpret_cast<const uint16_t*>(gate_up.const_data_ptr<at::BFloat16>()),
                      reinterpret_cast<const uint16_t*>(down.const_data_ptr<at::BFloat16>()), nullptr, nullptr, N,
                      k, E, H, I, o);
  else
    experts_for_pairs(s, xp, gate, gate_up.const_data_ptr<float>(), down.const_data_ptr<float>(), nullptr, nullptr,
                      N, k, E, H, I, o);
  return out;
}

at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights,
                          const at::Tensor& gate_up, const at::Tensor& down) {
  return experts_op(x, indices, weights, gate_up, down, nullptr, nullptr);
}

at::Tensor routed_experts_int8(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& weights,
                               const at::Tensor& gate_up, const at::Tensor& down, const at::Tensor& gate_up_scale,
                               const at::Tensor& down_scale) {
  return experts_op(x, indices, weights, gate_up, down, &gate_up_scale, &down_scale);
}

// Linear layers: y [N, O] = x [N, K] · Wᵀ with W packed once, at load (infer/layout.py), into panels of P output
// columns: panels [O / P, K, P], panels[b][k][j] = W[b·P + j][k]. A tile keeps MR rows × P columns of y in 2·MR
// registers and walks k: one step reads P weights, the next ones in memory, and one number of each of the MR rows,
// broadcast. An outer product, as a BLAS's inner kernel computes, with no sums across a vector at the end, and the
// weights read as one sequential stream. W as stored ([O, K]) needs dot products (a sum across each vector, more
// loads per FMA): 1.05-1.6x slower here at 1-16 rows; MKL's sgemm packs W like this at every call, which at 16 rows
// took longer than the products (docs/LOG.md, 2026-11-30). gcc 12 kept an array of accumulators on the stack (a
// store per FMA, half the speed), so they are named variables.
constexpr int64_t P = 2 * V;  // columns per panel: two vectors
constexpr int MR = 6;         // rows per tile: 12 accumulators + 2 weight vectors + 1 broadcast of AVX2's 16 registers
constexpr int64_t AHEAD_K = 32;  // prefetch distance in steps of k (2 KB on AVX2), into the next panel near the end

template <int M>
__attribute__((noinline)) static void panel_tile(const float* p, int64_t K, const float* x, int64_t ldx, float* out,
                                                 int64_t ldo) {
  static_assert(M >= 1 && M <= MR);
  vec c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {}, c40 = {}, c41 = {}, c50 = {},
      c51 = {};
  int64_t k = 0;
  if constexpr (M == 1) {  // one row: two steps of k at a time into two sets of sums, 4 chains of FMAs, not 2
    for (; k + 2 <= K; k += 2) {
      for (int64_t l = 0; l < 2 * P; l += LINE) __builtin_prefetch(p + (k + AHEAD_K) * P + l);
      c00 += x[k] * load(p + k * P);
      c01 += x[k] * load(p + k * P + V);
      c10 += x[k + 1] * load(p + (k + 1) * P);
      c11 += x[k + 1] * load(p + (k + 1) * P + V);
    }
    c00 += c10;
    c01 += c11;
  }
  for (; k < K; ++k) {
    for (int64_t l = 0; l < P; l += LINE) __builtin_prefetch(p + (k + AHEAD_K) * P + l);
    const vec w0 = load(p + k * P), w1 = load(p + k * P + V);
    if constexpr (M > 0) { const float a = x[k];           c00 += a * w0; c01 += a * w1; }
    if constexpr (M > 1) { const float a = x[ldx + k];     c10 += a * w0; c11 += a * w1; }
    if constexpr (M > 2) { const float a = x[2 * ldx + k]; c20 += a * w0; c21 += a * w1; }
    if constexpr (M > 3) { const float a = x[3 * ldx + k]; c30 += a * w0; c31 += a * w1; }
    if constexpr (M > 4) { const float a = x[4 * ldx + k]; c40 += a * w0; c41 += a * w1; }
    if constexpr (M > 5) { const float a = x[5 * ldx + k]; c50 += a * w0; c51 += a * w1; }
  }
  const auto put = [&](int i, const vec& lo, const vec& hi) {
    std::memcpy(out + i * ldo, &lo, sizeof lo);
    std::memcpy(out + i * ldo + V, &hi, sizeof hi);
  };
  if constexpr (M > 0) put(0, c00, c01);
  if constexpr (M > 1) put(1, c10, c11);
  if constexpr (M > 2) put(2, c20, c21);
  if constexpr (M > 3) put(3, c30, c31);
  if constexpr (M > 4) put(4, c40, c41);
  if constexpr (M > 5) put(5, c50, c51);
}

// tile(std::integral_constant<int, m>{}) for rows m in [1, MAX] (a tile's height is a template argument); nothing
// for m outside.
template <int MAX, typename F>
static void with_height(int64_t m, const F& tile) {
  [&]<int... H>(std::integer_sequence<int, H...>) {
    ((m == H + 1 ? (tile(std::integral_constant<int, H + 1>{}), 0) : 0), ...);
  }(std::make_integer_sequence<int, MAX>{});
}

// m < MR rows left over: the tile of that height.
static void panel_rest(int64_t m, const float* p, int64_t K, const float* x, int64_t ldx, float* out, int64_t ldo) {
  with_height<MR - 1>(m, [&](auto M) { panel_tile<decltype(M)::value>(p, K, x, ldx, out, ldo); });
}

int64_t panel_width() { return P; }

// Whether bf16 products run on the CPU's own instructions (AVX512-BF16), not widened to float32.
bool bf16_products() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// bf16 panels (`--matmul-dtype bf16`): [O / P, K2, P, 2] bf16, K = 2·K2, panels[b][kk][j] = (W[b·P + j][2kk],
// W[b·P + j][2kk + 1]): the pair `vdpbf16ps` multiplies with a pair of x's, broadcast. x is rounded to bf16 once
// per call; its pair kk of row i, (x[i][2kk], x[i][2kk + 1]), is read as one 32-bit word (pair()).
static inline uint32_t pair(const uint16_t* x, int64_t kk) {
  uint32_t two;
  std::memcpy(&two, x + 2 * kk, sizeof two);
  return two;
}

#if defined(__AVX512BF16__)
constexpr int MR2 = 8;  // rows per tile: 16 accumulators + 2 weight vectors + 1 broadcast of AVX-512's 32 registers

template <int M>
__attribute__((noinline)) static void panel_tile_dp(const uint16_t* p, int64_t K2, const uint16_t* x, int64_t ldx,
                                                    float* out, int64_t ldo) {
  static_assert(P == 2 * V && V == 16 && M >= 1 && M <= MR2, "a panel step: two vectors of 16 column pairs");
  __m512 c[M][2];
  for (int i = 0; i < M; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  int64_t kk = 0;
  if constexpr (M == 1) {  // one row: two pairs at a time into two sets of sums, 4 chains, not 2
    __m512 d0 = _mm512_setzero_ps(), d1 = d0;
    for (; kk + 2 <= K2; kk += 2) {
      for (int64_t l = 0; l < 4 * P; l += 2 * LINE) __builtin_prefetch(p + (kk + AHEAD_K) * 2 * P + l);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(pair(x, kk))),
                     b = (__m512bh)_mm512_set1_epi32(int(pair(x, kk + 1)));
      c[0][0] = _mm512_dpbf16_ps(c[0][0], a, load_bh(p + kk * 2 * P));
      c[0][1] = _mm512_dpbf16_ps(c[0][1], a, load_bh(p + kk * 2 * P + BV));
      d0 = _mm512_dpbf16_ps(d0, b, load_bh(p + (kk + 1) * 2 * P));
      d1 = _mm512_dpbf16_ps(d1, b, load_bh(p + (kk + 1) * 2 * P + BV));
    }
    c[0][0] = _mm512_add_ps(c[0][0], d0);
    c[0][1] = _mm512_add_ps(c[0][1], d1);
  }
  for (; kk < K2; ++kk) {
    for (int64_t l = 0; l < 2 * P; l += 2 * LINE) __builtin_prefetch(p + (kk + AHEAD_K) * 2 * P + l);
    const __m512bh w0 = load_bh(p + kk * 2 * P), w1 = load_bh(p + kk * 2 * P + BV);
    for (int i = 0; i < M; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(pair(x + i * ldx, kk)));
      c[i][0] = _mm512_dpbf16_ps(c[i][0], a, w0);
      c[i][1] = _mm512_dpbf16_ps(c[i][1], a, w1);
    }
  }
  for (int i = 0; i < M; ++i) {
    _mm512_storeu_ps(out + i * ldo, c[i][0]);
    _mm512_storeu_ps(out + i * ldo + V, c[i][1]);
  }
}

static void panel_rows_bf16(int64_t m, const uint16_t* p, int64_t K2, const uint16_t* x, int64_t ldx, float* out,
                            int64_t ldo) {
  for (; m >= MR2; m -= MR2, x += MR2 * ldx, out += MR2 * ldo) panel_tile_dp<MR2>(p, K2, x, ldx, out, ldo);
  with_height<MR2 - 1>(m, [&](auto M) { panel_tile_dp<decltype(M)::value>(p, K2, x, ldx, out, ldo); });
}
#else
// Without AVX512-BF16: the same products, both factors widened exactly to float32 (a bf16 is a float32's upper half).
static void panel_rows_bf16(int64_t m, const uint16_t* p, int64_t K2, const uint16_t* x, int64_t ldx, float* out,
                            int64_t ldo) {
  typedef uint32_t uvec __attribute__((vector_size(V * sizeof(uint32_t))));
  const auto as_float = [](uvec u) {
    vec v;
    std::memcpy(&v, &u, sizeof v);
    return v;
  };
  for (int64_t i = 0; i < m; ++i) {
    vec c[P / V];
    for (auto& a : c) a = vec{};
    for (int64_t kk = 0; kk < K2; ++kk) {
      const uint32_t two = pair(x + i * ldx, kk), lo_bits = two << 16, hi_bits = two & 0xffff0000u;
      float lo, hi;
      std::memcpy(&lo, &lo_bits, sizeof lo);
      std::memcpy(&hi, &hi_bits, sizeof hi);
      for (int64_t h = 0; h < P / V; ++h) {
        uvec u;
        std::memcpy(&u, p + (kk * P + h * V) * 2, sizeof u);
        c[h] += lo * as_float(u << 16) + hi * as_float(u & 0xffff0000u);
      }
    }
    std::memcpy(out + i * ldo, c, sizeof c);
  }
}
#endif

// MLA's absorbed products in bf16 (`--matmul-dtype bf16`): x [N, heads, in] times each head's own weight, packed as
// pack_experts packs an expert's ([heads, out / P, in / 2, P, 2]) -> [N, heads, out]: W_UKᵀ·q_nope and W_UV·o. With
// one head, a Linear layer (linear_panels_bf16).
at::Tensor heads_linear_bf16(const at::Tensor& x_, const at::Tensor& panels_) {
  TORCH_CHECK(x_.device().is_cpu() && x_.scalar_type() == at::kFloat && x_.dim() == 3,
              "heads_linear_bf16: x: expected a 3-d float32 CPU tensor [N, heads, in]");
  const int64_t N = x_.size(0), G = x_.size(1), K = x_.size(2), K2 = K / 2;
  TORCH_CHECK(panels_.device().is_cpu() && panels_.scalar_type() == at::kBFloat16 && panels_.dim() == 5 &&
                  panels_.size(0) == G && 2 * panels_.size(2) == K && panels_.size(3) == P && panels_.size(4) == 2,
              "heads_linear_bf16: expected bfloat16 panels [", G, ", out / ", P, ", ", K2, ", ", P,
              ", 2] for x [N, ", G, ", ", K, "] (kernels.pack_experts packs weights [heads, out, in] so)");
  const at::Tensor x = x_.contiguous(), panels = panels_.contiguous();
  const int64_t B = panels.size(1), O = B * P;
  at::Tensor out = at::empty({N, G, O}, x.options());
  if (N == 0 || G == 0 || B == 0) return out;
  if (K == 0) return out.zero_();
  std::vector<uint16_t> x2(N * G * K);  // x rounded to bf16
  round_bf16(x.const_data_ptr<float>(), N * G * K, x2.data());
  const auto* pp = reinterpret_cast<const uint16_t*>(panels.const_data_ptr<at::BFloat16>());
  float* o = out.mutable_data_ptr<float>();
  // a thread's share: ~128 KB of weights at least, less over many rows (a prefill), whose products are the work
  const int64_t grain = std::max<int64_t>(1, 131072 / (K2 * P * 4 * std::max<int64_t>(1, N / 16)));
  const int64_t chunk = std::max<int64_t>(8, 32768 / K2 / 8 * 8);  // ~128 KB of x's pairs, kept in cache
  at::parallel_for(0, G * B, grain, [&](int64_t j0, int64_t j1) {  // panel j: head j / B, its panel j % B
    for (int64_t r0 = 0; r0 < N; r0 += chunk)
      for (int64_t j = j0; j < j1; ++j)
        panel_rows_bf16(std::min(N, r0 + chunk) - r0, pp + j * K2 * 2 * P, K2, x2.data() + (r0 * G + j / B) * K,
                        G * K, o + (r0 * G + j / B) * O + j % B * P, G * O);
  });
  return out;
}

static at::Tensor linear_panels_bf16(const at::Tensor& x, const at::Tensor& panels) {
  const int64_t K = x.size(1);
  TORCH_CHECK(panels.dim() == 4 && 2 * panels.size(1) == K && panels.size(2) == P && panels.size(3) == 2,
              "linear_panels: expected bfloat16 panels [out / ", P, ", ", K / 2, ", ", P, ", 2] for x [N, ", K,
              "] (kernels.pack_linear packs a weight [out, in] so)");
  return heads_linear_bf16(x.unsqueeze(1), panels.unsqueeze(0)).squeeze(1);
}

// Routed experts in bf16 products (`--matmul-dtype bf16`): each expert's two matrices packed as Linear weights are
// (gate_up [E, 2I / P, H / 2, P, 2], down [E, H / P, I / 2, P, 2]), and each chosen expert applied, as a small Linear
// layer, to the rows of the tokens that chose it, gathered in expert order. A dot-product form (a row of weights
// times each token, then a sum across the vector, as experts_for_pairs does) spent as long on those sums as on the
// products at H = 256, I = 128: the outer products here have none.
at::Tensor routed_experts_bf16(const at::Tensor& x_, const at::Tensor& indices_, const at::Tensor& weights_,
                               const at::Tensor& gate_up_, const at::Tensor& down_) {
  check(x_, 2, "x", Weights::none);
  TORCH_CHECK(gate_up_.device().is_cpu() && down_.device().is_cpu() && gate_up_.scalar_type() == at::kBFloat16 &&
                  down_.scalar_type() == at::kBFloat16 && gate_up_.dim() == 5 && down_.dim() == 5 &&
                  gate_up_.size(3) == P && down_.size(3) == P && gate_up_.size(4) == 2 && down_.size(4) == 2,
              "routed_experts_bf16: expected bfloat16 CPU panels gate_up [E, 2I / ", P, ", H / 2, ", P,
              ", 2] and down [E, H / ", P, ", I / 2, ", P, ", 2] (kernels.pack_experts)");
  const at::Tensor x = x_.contiguous(), indices = indices_.to(at::kLong).contiguous(),
                   weights = weights_.to(at::kFloat).contiguous(), gate_up = gate_up_.contiguous(),
                   down = down_.contiguous();
  const int64_t N = x.size(0), k = indices.size(1), E = down.size(0), H = down.size(1) * P, I2 = down.size(2),
                I = 2 * I2, H2 = H / 2, Pn = N * k;
  TORCH_CHECK(x.size(1) == H && gate_up.size(0) == E && gate_up.size(1) * P == 2 * I && gate_up.size(2) == H2 &&
                  indices.size(0) == N && weights.sizes() == indices.sizes(),
              "routed_experts_bf16: mismatched shapes");
  if (Pn == 0 || H == 0 || I == 0) return at::zeros({N, H}, x.options());
  const Pairs s = sort_pairs(indices.const_data_ptr<int64_t>(), Pn, E);
  const std::vector<int64_t>& begin = s.begin;
  // the tokens' rows in expert order, rounded to bf16 (scratch left uninitialised: every element is written first)
  std::unique_ptr<uint16_t[]> x2(new uint16_t[Pn * H]), mid2(new uint16_t[Pn * I]);
  std::unique_ptr<float[]> gu(new float[Pn * 2 * I]), y(new float[Pn * H]);
  const float* xp = x.const_data_ptr<float>();
  at::parallel_for(0, Pn, PAIRS, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) round_bf16(xp + s.pair[q] / k * H, H, x2.get() + q * H);
  });
  const auto* w_gu = reinterpret_cast<const uint16_t*>(gate_up.const_data_ptr<at::BFloat16>());
  const auto* w_down = reinterpret_cast<const uint16_t*>(down.const_data_ptr<at::BFloat16>());
  const float* gate = weights.const_data_ptr<float>();
  // each thread its panels of every chosen expert (at least ~128 KB of weights)
  const auto over_panels = [&](int64_t panels, int64_t K2, const auto& body) {
    const int64_t grain = std::max<int64_t>(1, 131072 / (K2 * P * 4 * s.chosen));
    at::parallel_for(0, panels, grain, body);
  };
  over_panels(2 * I / P, H2, [&](int64_t b0, int64_t b1) {
    for (int64_t e = 0; e < E; ++e)
      for (int64_t b = b0; b < b1 && begin[e + 1] > begin[e]; ++b)
        panel_rows_bf16(begin[e + 1] - begin[e], w_gu + ((e * 2 * I / P) + b) * H2 * 2 * P, H2,
                        x2.get() + begin[e] * H, H, gu.get() + begin[e] * 2 * I + b * P, 2 * I);
  });
  hidden_of_pairs(s, gate, gu.get(), I, mid2.get());  // the down products' inputs, rounded
  at::Tensor out = at::empty({N, H}, x.options());
  float* o = out.mutable_data_ptr<float>();
  over_panels(H / P, I2, [&](int64_t b0, int64_t b1) {
    for (int64_t e = 0; e < E; ++e)
      for (int64_t b = b0; b < b1 && begin[e + 1] > begin[e]; ++b)
        panel_rows_bf16(begin[e + 1] - begin[e], w_down + ((e * H / P) + b) * I2 * 2 * P, I2,
                        mid2.get() + begin[e] * I, I, y.get() + begin[e] * H + b * P, H);
    sum_pairs(s, k, N, H, y.get(), b0 * P, b1 * P, o);
  });
  return out;
}

at::Tensor linear_panels(const at::Tensor& x_, const at::Tensor& panels_) {
  TORCH_CHECK(x_.device().is_cpu() && x_.scalar_type() == at::kFloat && x_.dim() == 2,
              "linear_panels: x: expected a 2-d float32 CPU tensor");
  TORCH_CHECK(panels_.device().is_cpu() && (panels_.scalar_type() == at::kFloat ||
                                            panels_.scalar_type() == at::kBFloat16),
              "linear_panels: expected float32 or bfloat16 CPU panels, got ", panels_.scalar_type());
  if (panels_.scalar_type() == at::kBFloat16) return linear_panels_bf16(x_.contiguous(), panels_);
  TORCH_CHECK(panels_.dim() == 3 && panels_.size(1) == x_.size(1) && panels_.size(2) == P,
              "linear_panels: expected float32 CPU panels [out / ", P, ", ", x_.size(1), ", ", P, "] for x [N, ",
              x_.size(1), "] (kernels.pack_linear packs a weight [out, in] so)");
  const at::Tensor x = x_.contiguous(), panels = panels_.contiguous();
  const int64_t N = x.size(0), K = x.size(1), B = panels.size(0), O = B * P;
  at::Tensor out = at::empty({N, O}, x.options());
  if (N == 0 || B == 0) return out;
  if (K == 0) return out.zero_();  // an empty sum
  const float *xp = x.const_data_ptr<float>(), *pp = panels.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  // Each thread its panels (at least ~128 KB of weights); rows in chunks of ~128 KB of x, which stay in cache while
  // the thread's panels go by (a long prefill's x does not fit), each panel read from L1 by every tile of a chunk.
  const int64_t grain = std::max<int64_t>(1, 131072 / (K * P * int64_t(sizeof(float))));
  const int64_t chunk = std::max<int64_t>(MR, 32768 / K / MR * MR);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
      const int64_t r1 = std::min(N, r0 + chunk);
      for (int64_t b = b0; b < b1; ++b) {
        int64_t i = r0;
        for (; i + MR <= r1; i += MR) panel_tile<MR>(pp + b * K * P, K, xp + i * K, K, o + i * O + b * P, O);
        panel_rest(r1 - i, pp + b * K * P, K, xp + i * K, K, o + i * O + b * P, O);
      }
    }
  });
  return out;
}

// MLA's absorbed attention for a decode step (infer/forward.py): every head of query row (b, t) attends over the same
// cached rows [c_kv | k_rope] of its slot, read where the cache keeps them. torch's path first gathers the batch's
// rows into a new tensor, then runs two small batched products (each packing its operand again) and a softmax
// between them: at a few hundred tokens of context that was ~45% of a batch-16 step (docs/LOG.md, 2026-11-30).

// The latent cache is like multi-query attention's (one key row for all heads), so a work item takes one query row
// and up to 12 of its heads, over its keys in blocks of KB. Within a block the tiles reuse what they load: scores in
// tiles of KT keys × HS heads, the weighted sum in tiles of HW heads × CV vectors of the latents, an online softmax
// in between. So each key comes from memory once per item, however long the context (before: once per 4 heads
// and pass, at 20-30% of the FMA rate; 1.0-1.8x slower, docs/LOG.md 2026-12-01).
#if defined(__AVX512F__)
constexpr int KT = 4;  // 4 keys × 4 heads: 16 accumulators + 4 keys + 4 queries of 32 registers
constexpr int CV = 4;  // 6 heads × 4 vectors: 24 accumulators + 4 key vectors + 1 weight
#else
constexpr int KT = 2;  // 8 + 2 + 4 of AVX2's 16
constexpr int CV = 2;  // 12 + 2 + 1
#endif
constexpr int HS = 4;   // heads per scores tile
constexpr int HW = 6;   // heads per weighted tile
constexpr int HG = 12;  // heads per work item at most

// s[i·ld + k + j] = scale · q_i·key_{k+j}, j < NK, for G heads' queries q (stride D). Key: float, or uint16_t for
// a bf16 cache (widened exactly as it is read).
template <int G, int NK, typename Key>
__attribute__((noinline)) static void score_tile(const float* q, const Key* keys, int64_t k, int64_t D, float scale,
                                                 float* s, int64_t ld) {
  vec acc[NK][G];
  for (int j = 0; j < NK; ++j)
    for (int i = 0; i < G; ++i) acc[j][i] = vec{};
  for (int64_t d = 0; d < D; d += V) {
    vec kv[NK];
    for (int j = 0; j < NK; ++j) kv[j] = load(keys + (k + j) * D + d);
    for (int i = 0; i < G; ++i) {
      const vec qv = load(q + i * D + d);
      for (int j = 0; j < NK; ++j) acc[j][i] += qv * kv[j];
    }
  }
  for (int j = 0; j < NK; ++j) {
    int i = 0;
    for (; i + 4 <= G; i += 4) {
      const quarter sum = hsum4(acc[j][i], acc[j][i + 1], acc[j][i + 2], acc[j][i + 3]) * scale;
      for (int u = 0; u < 4; ++u) s[(i + u) * ld + k + j] = sum[u];
    }
    for (; i < G; ++i) {
      const quarter f = fold4(acc[j][i]);
      s[i * ld + k + j] = (f[0] + f[1] + f[2] + f[3]) * scale;
    }
  }
}

// out[i·r + c + j·V] += Σ_{k < n, visible} p[i·ld + k] · key_k[c + j·V], j < NC, for G heads. Keys not visible
// are skipped (their p is 0, and a stale row may hold a NaN).
template <int G, int NC, typename Key>
__attribute__((noinline)) static void weighted_tile(const float* p, int64_t ld, const Key* keys, const bool* visible,
                                                    int64_t n, int64_t D, int64_t c, int64_t r, float* out) {
  vec acc[G][NC];
  for (int i = 0; i < G; ++i)
    for (int j = 0; j < NC; ++j) acc[i][j] = load(out + i * r + c + j * V);
  for (int64_t k = 0; k < n; ++k) {
    if (!visible[k]) continue;
    vec kv[NC];
    for (int j = 0; j < NC; ++j) kv[j] = load(keys + k * D + c + j * V);
    for (int i = 0; i < G; ++i) {
      const vec w = splat(p[i * ld + k]);
      for (int j = 0; j < NC; ++j) acc[i][j] += w * kv[j];
    }
  }
  for (int i = 0; i < G; ++i)
    for (int j = 0; j < NC; ++j) std::memcpy(out + i * r + c + j * V, &acc[i][j], sizeof(vec));
}

// The G heads from head 0 in tiles of HT, 4, 2 and 1 (a template's accumulators stay in registers): f(tile, g).
template <int HT, typename F>
static void head_tiles(int64_t G, F&& f) {
  for (int64_t g = 0; g < G;) {
    const int64_t left = G - g;
    if (left >= HT) {
      f(std::integral_constant<int, HT>{}, g), g += HT;
    } else if (HT > 4 && left >= 4) {
      f(std::integral_constant<int, 4>{}, g), g += 4;
    } else if (left >= 2) {
      f(std::integral_constant<int, 2>{}, g), g += 2;
    } else {
      f(std::integral_constant<int, 1>{}, g), g += 1;
    }
  }
}

// One block of a head's scores in an online softmax (the running maximum m and sum l of the blocks before):
// s[0..n) -> exp(s - m') in place with m' = max(m, max s); returns exp(m - m'), the factor for what was summed
// before. A block with nothing visible yet gives zeros (factor 1). A NaN score makes the head NaN from then on, as
// in torch: a numerical failure upstream shows (a max that skipped it would hide it).
static float block_softmax(float* s, int64_t n, float& m, float& l) {
  float bm = -INFINITY;
  for (int64_t k = 0; k < n && bm == bm; ++k)
    if (!(s[k] <= bm)) bm = s[k];
  if (bm != bm || m != m) {
    std::fill(s, s + n, NAN);
    m = l = NAN;
    return NAN;
  }
  const float m2 = std::max(m, bm);
  if (m2 == -INFINITY) {
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  vec sum = vec{};
  int64_t k = 0;
  for (; k + V <= n; k += V) {
    const vec e = exp_nonpositive(load(s + k) - m2);
    std::memcpy(s + k, &e, sizeof e);
    sum += e;
  }
  float total = 0.0f;
  for (int64_t i = 0; i < V; ++i) total += sum[i];
  for (; k < n; ++k) total += s[k] = s[k] == -INFINITY ? 0.0f : std::exp(s[k] - m2);
  const float factor = m == -INFINITY ? 0.0f : std::exp(m - m2);
  m = m2;
  l = l * factor + total;
  return factor;
}

// Keys per block: a block's rows stay in L1 (37 KB at the `small` preset's 288 floats) while every tile reads them.
constexpr int64_t KB = 32;
// Keys per part at least, where one sequence's keys are split over the threads.
constexpr int64_t SPLIT_KEYS = 128;

// out (G rows of r, stride r) scaled by f[i] per head.
static void scale_heads(int64_t G, int64_t r, const float* f, float* out) {
  for (int64_t i = 0; i < G; ++i)
    for (int64_t c = 0; c < r; c += V) {
      const vec a = load(out + i * r + c) * f[i];
      std::memcpy(out + i * r + c, &a, sizeof a);
    }
}

// G heads of one query row (queries q, stride D) over its first n keys (those past n are not visible): per block
// of keys their scores, an online softmax, and the weighted sum of their latents added to out (stride r; rescaled
// first where the running maximum grew). Leaves out unnormalised, with each head's maximum m and sum l (the merge of
// parts of a row's keys needs them); finish() divides. s: scratch of G·KB floats.
template <typename Key>
static void attend_heads(int64_t G, const float* q, const Key* keys, const bool* visible, int64_t n, int64_t D,
                         int64_t r, float scale, float* s, float* out, float* m, float* l) {
  std::fill(m, m + G, -INFINITY);
  std::fill(l, l + G, 0.0f);
  std::fill(out, out + G * r, 0.0f);
  for (int64_t k0 = 0; k0 < n; k0 += KB) {
    const int64_t nb = std::min(KB, n - k0);
    const Key* block = keys + k0 * D;
    const bool* seen = visible + k0;
    int64_t k = 0;
    for (; k + KT <= nb; k += KT)
      head_tiles<HS>(G, [&](auto t, int64_t g) { score_tile<decltype(t)::value, KT>(q + g * D, block, k, D, scale,
                                                                                 s + g * nb, nb); });
    for (; k < nb; ++k)
      head_tiles<HS>(G, [&](auto t, int64_t g) { score_tile<decltype(t)::value, 1>(q + g * D, block, k, D, scale,
                                                                                s + g * nb, nb); });
    for (int64_t i = 0; i < G; ++i) {
      for (k = 0; k < nb; ++k)
        if (!seen[k]) s[i * nb + k] = -INFINITY;  // overwritten, not added to: a stale row's NaN stays out
      const float factor = block_softmax(s + i * nb, nb, m[i], l[i]);
      if (factor != 1.0f) scale_heads(1, r, &factor, out + i * r);
    }
    int64_t c = 0;
    for (; c + CV * V <= r; c += CV * V)
      head_tiles<HW>(G, [&](auto t, int64_t g) {
        weighted_tile<decltype(t)::value, CV>(s + g * nb, nb, block, seen, nb, D, c, r, out + g * r);
      });
    for (; c < r; c += V)
      head_tiles<HW>(G, [&](auto t, int64_t g) {
        weighted_tile<decltype(t)::value, 1>(s + g * nb, nb, block, seen, nb, D, c, r, out + g * r);
      });
  }
}

// The softmax's division: 1 / l per head. l = 0: no visible key gives zeros, but visible keys that all scored -inf
// give NaN, as torch's softmax does (a numerical failure upstream shows); a NaN stays NaN.
static void finish(int64_t G, int64_t r, const float* l, bool any_visible, float* out) {
  float inv[HG];
  for (int64_t i = 0; i < G; ++i) inv[i] = l[i] > 0.0f ? 1.0f / l[i] : l[i] == 0.0f && !any_visible ? 0.0f : NAN;
  scale_heads(G, r, inv, out);
}

// q [B, T, h, D] (D = r + rope) float32, rows [S, L, D] float32 or bfloat16 (one layer's cache), slots [B] long,
// visible [B, T, K] bool (K <= L) -> [B, T, h, r]: per query row and head, softmax(scale · q·keysᵀ) over the
// visible keys of its slot, times the keys' first r columns (the latents are MLA's values).
at::Tensor latent_attention(const at::Tensor& q_, const at::Tensor& rows_, const at::Tensor& slots_,
                            const at::Tensor& visible_, double scale, int64_t r) {
  TORCH_CHECK(q_.device().is_cpu() && q_.scalar_type() == at::kFloat && q_.dim() == 4,
              "latent_attention: q: expected a 4-d float32 CPU tensor [B, T, heads, D]");
  TORCH_CHECK(rows_.device().is_cpu() &&
                  (rows_.scalar_type() == at::kFloat || rows_.scalar_type() == at::kBFloat16) && rows_.dim() == 3 &&
                  rows_.size(2) == q_.size(3),
              "latent_attention: rows: expected a float32 or bfloat16 CPU cache [slots, max_len, ", q_.size(3), "]");
  const int64_t B = q_.size(0), T = q_.size(1), h = q_.size(2), D = q_.size(3);
  TORCH_CHECK(D % LINE == 0 && r > 0 && r % LINE == 0 && r <= D, "latent_attention: D (", D, ") and r (", r,
              ") must be multiples of ", LINE, " with 0 < r <= D");
  TORCH_CHECK(slots_.dim() == 1 && slots_.size(0) == B && visible_.scalar_type() == at::kBool &&
                  visible_.dim() == 3 && visible_.size(0) == B && visible_.size(1) == T &&
                  visible_.size(2) <= rows_.size(1),
              "latent_attention: expected slots [B] and a bool mask visible [B, T, K] with K <= the cache's length");
  const at::Tensor q = q_.contiguous(), rows = rows_.contiguous(), slots = slots_.to(at::kLong).contiguous(),
                   visible = visible_.contiguous();
  const int64_t K = visible.size(2), L = rows.size(1), S = rows.size(0);
  const int64_t* slot = slots.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(slot[b] >= 0 && slot[b] < S, "latent_attention: slot ", slot[b], " out of range [0, ", S, ")");
  at::Tensor out = at::empty({B, T, h, r}, q.options());
  const float* qp = q.const_data_ptr<float>();
  const bool* vis = visible.const_data_ptr<bool>();
  float* o = out.mutable_data_ptr<float>();
  if (B * T * h == 0) return out;
  // Work items: (query row, group of up to 12 heads, part of its keys). All heads of a row in one item read each key
  // once. With fewer rows than twice the threads (one sequence decoding), a long context's keys are split into a
  // part per thread (flash-decoding), merged by their maxima and sums; a short one's heads go in groups of 4.
  const int64_t threads = at::get_num_threads(), few = B * T < 2 * threads;
  const int64_t parts = few ? std::max<int64_t>(1, std::min(threads, K / SPLIT_KEYS)) : 1;
  const int64_t per_item = few && parts == 1 ? 4 : HG;
  const int64_t groups = (h + per_item - 1) / per_item, items = B * T * groups;
  // Each thread at least ~64 KB of keys to read: less is not worth waking a second one.
  const int64_t grain = std::max<int64_t>(1, 16384 * parts / std::max<int64_t>(1, K * D));
  std::vector<float> part_out(parts > 1 ? items * parts * per_item * r : 0), part_ml(2 * items * parts * per_item);
  const auto attend = [&](const auto* cache) {
    at::parallel_for(0, items * parts, grain, [&](int64_t w0, int64_t w1) {
      std::vector<float> s(per_item * KB);
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t item = w / parts, part = w % parts;
        const int64_t i = item / groups, g0 = item % groups * per_item, G = std::min<int64_t>(per_item, h - g0);
        const auto* keys = cache + slot[i / T] * L * D;
        const bool* seen = vis + i * K;
        int64_t n = K;  // keys past the last visible one (a causal prefill's later positions) are not read
        while (n > 0 && !seen[n - 1]) --n;
        const int64_t share = (n + parts - 1) / parts, k0 = std::min(n, part * share), k1 = std::min(n, k0 + share);
        float* dst = parts > 1 ? part_out.data() + w * per_item * r : o + (i * h + g0) * r;
        float *m = part_ml.data() + 2 * w * per_item, *l = m + per_item;
        attend_heads(G, qp + (i * h + g0) * D, keys + k0 * D, seen + k0, k1 - k0, D, r, float(scale), s.data(), dst,
                     m, l);
        if (parts == 1) finish(G, r, l, n > 0, dst);
      }
    });
  };
  if (rows.scalar_type() == at::kFloat)
    attend(rows.const_data_ptr<float>());
  else  // bf16: the upper half of a float32, widened exactly as it is read (load(const uint16_t*))
    attend(reinterpret_cast<const uint16_t*>(rows.const_data_ptr<at::BFloat16>()));
  // The parts of a row's keys: out = Σ e^(m_p - m) · out_p / Σ e^(m_p - m) · l_p with m the largest m_p (a NaN in any
  // part makes the head NaN; a part that saw no key has l_p = 0 and adds nothing).
  for (int64_t item = 0; parts > 1 && item < items; ++item) {
    const int64_t i = item / groups, g0 = item % groups * per_item, G = std::min<int64_t>(per_item, h - g0);
    float* dst = o + (i * h + g0) * r;
    std::fill(dst, dst + G * r, 0.0f);
    float top[HG], l[HG], f[HG];
    for (int64_t g = 0; g < G; ++g) {
      top[g] = -INFINITY;
      for (int64_t part = 0; part < parts && top[g] == top[g]; ++part) {
        const float mp = part_ml[2 * (item * parts + part) * per_item + g];
        if (!(mp <= top[g])) top[g] = mp;
      }
      l[g] = top[g] == top[g] ? 0.0f : NAN;
    }
    for (int64_t part = 0; part < parts; ++part) {
      const float* ml = part_ml.data() + 2 * (item * parts + part) * per_item;
      for (int64_t g = 0; g < G; ++g) {
        f[g] = top[g] != top[g] ? NAN : ml[g] == -INFINITY ? 0.0f : std::exp(ml[g] - top[g]);
        l[g] += f[g] * ml[per_item + g];
      }
      const float* src = part_out.data() + (item * parts + part) * per_item * r;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = 0; c < r; c += V) {
          const vec a = load(dst + g * r + c) + load(src + g * r + c) * f[g];
          std::memcpy(dst + g * r + c, &a, sizeof a);
        }
    }
    const bool* seen = vis + i * K;
    finish(G, r, l, std::any_of(seen, seen + K, [](bool v) { return v; }), dst);
  }
  return out;
}

// The schema is defined in infer/kernels.py (at import, before this library is built).
TORCH_LIBRARY_IMPL(nanoseek_cpu, CPU, m) {
  m.impl("routed_experts", &routed_experts);
  m.impl("routed_experts_int8", &routed_experts_int8);
  m.impl("routed_experts_bf16", &routed_experts_bf16);
  m.impl("linear_panels", &linear_panels);
  m.impl("heads_linear_bf16", &heads_linear_bf16);
  m.impl("latent_attention", &latent_attention);
}

TORCH_LIBRARY_IMPL(nanoseek_cpu, CompositeExplicitAutograd, m) {  // no tensor arguments: no device to dispatch on
  m.impl("panel_width", &panel_width);
  m.impl("bf16_products", &bf16_products);
}
