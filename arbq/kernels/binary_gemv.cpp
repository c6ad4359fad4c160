// arbq packed 1-bit linear on CPU: batch-1 GEMV straight from the bits, and row-tile dequantization.
//
// Weight (arbq.methods.result):  W[i,j] = mu[k,g] + a[k,g,0] c[g,0,j] s1 + k a[k,g,1] c[g,1,j] s2
// with k = salient[j], g = group bit, s = +-1 and values per (row i, block t); z_go = c[g,o,:] * x
// (z = x without column scales). The GEMV sums signed inputs under bit masks (t = -s z is one masked
// negation), so the product needs only masked adds:
//
//  pass 1  every column of a block, as if all were non-salient, 16 fp32 or 32 fp16 lanes at a time:
//          P0 = sum t0, P0g = sum_g t0, P1g = sum_g t1 (t_g = -s1 z_g0), Xg = sum_g x for the means;
//  pass 2  the block's salient columns only, from 16-bit words of salient bits aligned per block
//          (prepared once per layer) and x gathered the same way (once per call): kind-1 sums; the
//          share pass 1 counted with kind-0 values is removed through value differences (dv);
//  end     each slot's sum vector times its value (a lane broadcast) is added to one vector per row;
//          row-invariant terms (block sums of x for the means) enter through one FMA with a per-block
//          lane vector; one horizontal reduction per row, never per block.
//
// binary_nm (arbq.packed.nm): the sign and group planes hold only the kept positions' bits ([N, Lb] compact
// rows); each row is expanded into a per-thread scratch row by the occupancy plane keep [N, Kb]
// (expand_row: one pdep per 64 columns), pruned bits 0. Every sum that pass 1 takes over all columns (P0,
// and the means' / TZ's sum of x, per row here: XK) is masked by keep, and so are pass 2's (S1a, S2a, SXK,
// from keep words aligned like the salient words), so pruned positions contribute exactly 0.
//
// Padding lanes of x and padding bits are zero, so no tail masks are needed. Rows are split across
// threads (at::parallel_for, OpenMP); R rows share every x load. Loading a mask costs a p5 uop like the
// add itself, so fewer masks per column (fp16 lanes: 32 columns per mask) is what makes it faster.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define ARBQ_AVX512 1
#else
#define ARBQ_AVX512 0
#endif
#if defined(__BMI2__) && !ARBQ_AVX512
#include <immintrin.h>
#endif
#if ARBQ_AVX512 && defined(__AVX512FP16__)
#define ARBQ_FP16 1
#else
#define ARBQ_FP16 0
#endif
#if ARBQ_AVX512 && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define ARBQ_LUT16 1      // int16 tables: vpermw lookups, vpdpwssd sums (binary_gemv_lut_avx512.cpp)
#else
#define ARBQ_LUT16 0
#endif

namespace {

// kernel slot ids: alpha (kind, group, order) and mu (kind, group)
enum Slot { A00 = 0, A01, A10_1, A11_1, A10_2, A11_2, M00, M01, M10, M11, NSLOT };
constexpr int kZeroLane = 15;  // lane of a row-block's value vector that is always 0 (V <= 10)

struct Layer {
  int64_t N, K, B, T, Kb, W, S, S2b, V;
  const uint8_t *s1, *grp;          // [N, Kb] planes
  const uint8_t *s1w, *gw, *s2w;    // [N, 2W] salient bits, 16-bit words aligned per block
  const uint8_t* s2raw;             // [N, S2b] the stored sign2 plane (scalar path)
  const int32_t *woff, *spos, *sidx;  // [T+1] word offsets; [S] aligned position, column of salient p
  const void* vals;
  int vdtype;
  float vscale;
  int pos[NSLOT];                   // slot -> lane of the row-block value vector (kZeroLane if unused)
  const float* cs;                  // [4, K] column scales, index 2g + o (RC only)
  bool rc, grp_on, cgb, sal;
  bool nm;                          // binary_nm: s1 / grp are compact [N, Lb] rows, expanded by keep
  int64_t Lb;                       // bytes per row of s1 / grp (Kb unless nm)
  const uint8_t *keep, *kw;         // [N, Kb] occupancy plane; [N, 2W] its salient bits aligned like s1w
  int step;                         // binary_nm: compact bits per 64 columns if m divides 64, else 0
};

float fp8_lut[256];

void init_fp8_lut() {
  static bool done = false;
  if (done) return;
  for (int b = 0; b < 256; ++b) fp8_lut[b] = c10::detail::fp8e4m3fn_to_fp32_value(static_cast<uint8_t>(b));
  done = true;
}

// Values of row i, block t -> dst[0..15] (dst[V..15] = 0), before the fp8 factor.
inline void load_vals(const Layer& a, int64_t i, int64_t t, float* dst) {
  const int64_t off = (i * a.T + t) * a.V;
  for (int v = 0; v < 16; ++v) dst[v] = 0.f;
  for (int64_t v = 0; v < a.V; ++v) {
    switch (a.vdtype) {
      case 0: dst[v] = static_cast<const float*>(a.vals)[off + v]; break;
      case 1: dst[v] = static_cast<float>(static_cast<const c10::Half*>(a.vals)[off + v]); break;
      case 2: dst[v] = static_cast<float>(static_cast<const c10::BFloat16*>(a.vals)[off + v]); break;
      default: dst[v] = fp8_lut[static_cast<const uint8_t*>(a.vals)[off + v]]; break;
    }
  }
}

inline int bit_at(const uint8_t* row, int64_t j) { return (row[j >> 3] >> (j & 7)) & 1; }

// ---------------------------------------------------------------- binary_nm: compact rows -> dense rows

inline uint64_t load_bytes(const uint8_t* p, int64_t avail) {   // up to 8 bytes, little endian
  uint64_t v = 0;
  if (avail >= 8) std::memcpy(&v, p, 8);
  else if (avail > 0) std::memcpy(&v, p, static_cast<size_t>(avail));
  return v;
}

// The low popcount(mask) bits of `bits` placed at the set bits of mask, in order (BMI2 pdep).
inline uint64_t deposit(uint64_t bits, uint64_t mask) {
#if defined(__BMI2__)
  return _pdep_u64(bits, mask);
#else
  uint64_t out = 0;
  for (uint64_t b = 1; mask; b <<= 1, mask &= mask - 1)
    if (bits & b) out |= mask & (~mask + 1);
  return out;
#endif
}

// 64 columns: the compact bits of src from bit `off` deposited at the set bits of the 8 keep bytes into 8 dst
// bytes (src must hold 9 bytes from off / 8); returns the bits used (popcount of keep).
inline int expand64(const uint8_t* src, int64_t off, const uint8_t* keep, uint8_t* dst) {
  uint64_t km, bits;
  std::memcpy(&km, keep, 8);
  std::memcpy(&bits, src + (off >> 3), 8);
  const int sh = static_cast<int>(off & 7);         // always 0 for m = 8
  if (sh) bits = (bits >> sh) | (static_cast<uint64_t>(src[(off >> 3) + 8]) << (64 - sh));
  const uint64_t d = deposit(bits, km);
  std::memcpy(dst, &d, 8);
  return __builtin_popcountll(km);
}

// Dense row dst [Kb] of a compact row src [Lb] (the kept columns' bits in column order, LSB first) by the
// occupancy row keep [Kb]: 0 at pruned columns. step: bits of src per 64 columns when every 64 columns keep
// the same number (m divides 64: 64 n / m, for m = 8 exactly n bytes), else 0 (counted from keep, serially);
// full: 64-column words wholly inside K (K / 64: only full runs of m there, since m divides 64).
inline void expand_row(const uint8_t* src, int64_t Lb, const uint8_t* keep, int64_t Kb, uint8_t* dst, int step,
                       int64_t full) {
  int64_t off = 0, b = 0;                           // bits of src used so far; columns / 8 done
  if (step > 0 && 8 * Lb >= 72) {                  // independent iterations: offsets known in advance
    const int64_t words = std::min(full, (8 * Lb - 72) / step + 1);   // (off >> 3) + 9 <= Lb for each
    for (int64_t w = 0; w < words; ++w) expand64(src, w * step, keep + 8 * w, dst + 8 * w);
    b = 8 * words;
    off = b / 8 * step;
  }
  for (; b + 8 <= Kb && (off >> 3) + 9 <= Lb; b += 8)    // 64 columns, fixed-size loads (no bounds)
    off += expand64(src, off, keep + b, dst + b);
  for (; b < Kb; b += 8) {                          // the row's last bytes
    const int64_t nb = std::min<int64_t>(8, Kb - b);
    const uint64_t km = load_bytes(keep + b, nb);
    const int cnt = __builtin_popcountll(km);
    const int64_t byte = off >> 3;
    const int sh = static_cast<int>(off & 7);
    uint64_t bits = load_bytes(src + byte, Lb - byte) >> sh;
    if (sh && sh + cnt > 64 && byte + 8 < Lb) bits |= static_cast<uint64_t>(src[byte + 8]) << (64 - sh);
    const uint64_t d = deposit(bits, km);
    for (int64_t q = 0; q < nb; ++q) dst[b + q] = static_cast<uint8_t>(d >> (8 * q));
    off += cnt;
  }
}

// Dense sign1 / group rows of row i: the planes' own rows, or (binary_nm) expanded into buf [2 Kb].
inline void dense_rows(const Layer& a, int64_t i, uint8_t* buf, const uint8_t** s1, const uint8_t** g) {
  if (!a.nm) {
    *s1 = a.s1 + i * a.Kb;
    *g = a.grp_on ? a.grp + i * a.Kb : nullptr;
    return;
  }
  expand_row(a.s1 + i * a.Lb, a.Lb, a.keep + i * a.Kb, a.Kb, buf, a.step, a.K / 64);
  *s1 = buf;
  *g = nullptr;
  if (a.grp_on) {
    expand_row(a.grp + i * a.Lb, a.Lb, a.keep + i * a.Kb, a.Kb, buf + a.Kb, a.step, a.K / 64);
    *g = buf + a.Kb;
  }
}

// ---------------------------------------------------------------- scalar: any CPU, any block size

// W[i, j] by the result equation from row i's dense planes s1r, gr (dense_rows); cidx[j] = compact index
// of a salient column, else -1; 0 at a pruned position (binary_nm).
inline float weight_at(const Layer& a, const uint8_t* s1r, const uint8_t* gr, int64_t i, int64_t j,
                       const int32_t* cidx, const float* v) {
  if (a.nm && !bit_at(a.keep + i * a.Kb, j)) return 0.f;
  const int k = cidx[j] >= 0;
  const int g = a.grp_on ? bit_at(gr, j) : 0;
  const float s1 = bit_at(s1r, j) ? 1.f : -1.f;
  float w = v[a.pos[k ? (g ? A11_1 : A10_1) : (g ? A01 : A00)]] * (a.rc ? a.cs[2 * g * a.K + j] : 1.f) * s1;
  if (!a.rc) w += v[a.pos[k ? (g ? M11 : M10) : (g ? M01 : M00)]];
  if (k) {
    const float s2 = bit_at(a.s2raw + i * a.S2b, cidx[j]) ? 1.f : -1.f;
    w += v[a.pos[g ? A11_2 : A10_2]] * (a.rc ? a.cs[(2 * g + 1) * a.K + j] : 1.f) * s2;
  }
  return w;
}

void dequant_scalar(const Layer& a, const int32_t* cidx, int64_t r0, int64_t r1, float* out) {
  at::parallel_for(r0, r1, 1, [&](int64_t b, int64_t e) {
    float v[16];
    std::vector<uint8_t> buf(a.nm ? 2 * a.Kb : 0);
    const uint8_t *s1r, *gr;
    for (int64_t i = b; i < e; ++i) {
      dense_rows(a, i, buf.data(), &s1r, &gr);
      for (int64_t t = 0; t < a.T; ++t) {
        load_vals(a, i, t, v);
        for (int64_t r = 0; r < a.V; ++r) v[r] *= a.vscale;
        for (int64_t j = t * a.B; j < std::min((t + 1) * a.B, a.K); ++j)
          out[(i - r0) * a.K + j] = weight_at(a, s1r, gr, i, j, cidx, v);
      }
    }
  });
}

void gemv_scalar(const Layer& a, const int32_t* cidx, const float* x, float* y) {
  at::parallel_for(0, a.N, 1, [&](int64_t b, int64_t e) {
    float v[16];
    std::vector<uint8_t> buf(a.nm ? 2 * a.Kb : 0);
    const uint8_t *s1r, *gr;
    for (int64_t i = b; i < e; ++i) {
      dense_rows(a, i, buf.data(), &s1r, &gr);
      double acc = 0;
      for (int64_t t = 0; t < a.T; ++t) {
        load_vals(a, i, t, v);
        float blk = 0;
        for (int64_t j = t * a.B; j < std::min((t + 1) * a.B, a.K); ++j) blk += weight_at(a, s1r, gr, i, j, cidx, v) * x[j];
        acc += blk;
      }
      y[i] = static_cast<float>(acc) * a.vscale;
    }
  });
}

// bf16 bits of x, round to nearest even (what torch's .to(torch.bfloat16) gives; NaN stays a quiet NaN).
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if ARBQ_AVX512
// ---------------------------------------------------------------- AVX-512
#include "binary_gemv_avx512.cpp"
#include "binary_dequant_avx512.cpp"
#include "binary_gemv_lut_avx512.cpp"
#include "binary_gemv_sign_avx512.cpp"
#endif

// ---------------------------------------------------------------- bindings

template <class T>
const T* ptr(const torch::Tensor& t) { return t.numel() ? static_cast<const T*>(t.data_ptr()) : nullptr; }

Layer make_layer(const std::vector<torch::Tensor>& ts, double vscale, int64_t K, int64_t B,
                 const std::vector<bool>& flags) {
  // ts: sign1, group, s1w, gw, s2w, sign2, woff, spos, sidx, values, pos, cs (+ keep, kw, nm = [n, m] int32
  // for binary_nm);
  // flags: rc, group, cgb, salient (+ nm)
  const bool nm = flags.size() == 5 && flags[4];
  TORCH_CHECK(ts.size() == (nm ? 15u : 12u) && (flags.size() == 4 || flags.size() == 5), "arbq: bad kernel arguments");
  const auto &sign1 = ts[0], &s1w = ts[2], &sign2 = ts[5], &vals = ts[9], &pos = ts[10];
  for (const auto& t : ts) TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "arbq: tensors must be contiguous CPU");
  TORCH_CHECK(sign1.scalar_type() == torch::kUInt8 && sign1.dim() == 2, "sign1: uint8 [N, Kb]");
  TORCH_CHECK(vals.dim() == 3 && vals.size(2) <= 10 && pos.numel() == NSLOT, "values: [N, T, V<=10]");
  Layer a{};
  a.N = sign1.size(0); a.K = K; a.B = B; a.T = (K + B - 1) / B; a.Lb = sign1.size(1); a.V = vals.size(2);
  a.nm = nm;
  a.rc = flags[0]; a.grp_on = flags[1]; a.cgb = flags[2]; a.sal = flags[3];
  a.Kb = nm ? ts[12].size(1) : a.Lb;
  TORCH_CHECK(a.Kb == (K + 7) / 8 && vals.size(0) == a.N && vals.size(1) == a.T, "arbq: packed shapes disagree");
  if (nm) {
    TORCH_CHECK(ts[12].scalar_type() == torch::kUInt8 && ts[12].dim() == 2 && ts[12].size(0) == a.N &&
                a.Lb <= a.Kb && (ts[1].numel() == 0 || ts[1].size(1) == a.Lb), "arbq: binary_nm planes disagree");
    a.keep = ts[12].data_ptr<uint8_t>();
    a.kw = ptr<uint8_t>(ts[13]);
    TORCH_CHECK(ts[14].scalar_type() == torch::kInt && ts[14].numel() == 2, "arbq: binary_nm n:m must be int32 [2]");
    const int n_keep = ts[14].data_ptr<int32_t>()[0], m = ts[14].data_ptr<int32_t>()[1];
    TORCH_CHECK(1 <= n_keep && n_keep <= m && m <= 64, "arbq: bad binary_nm n:m");
    a.step = 64 % m == 0 ? 64 / m * n_keep : 0;
    TORCH_CHECK(!a.sal || (ts[13].dim() == 2 && ts[13].size(0) == a.N && ts[13].size(1) == s1w.size(1)),
                "arbq: binary_nm keep words disagree with the salient words");
  }
  a.s1 = sign1.data_ptr<uint8_t>();
  a.grp = ptr<uint8_t>(ts[1]); a.s1w = ptr<uint8_t>(s1w); a.gw = ptr<uint8_t>(ts[3]); a.s2w = ptr<uint8_t>(ts[4]);
  a.s2raw = ptr<uint8_t>(sign2);
  a.W = s1w.dim() == 2 ? s1w.size(1) / 2 : 0;
  a.S2b = sign2.dim() == 2 ? sign2.size(1) : 0;
  a.woff = ptr<int32_t>(ts[6]); a.spos = ptr<int32_t>(ts[7]); a.sidx = ptr<int32_t>(ts[8]);
  a.S = ts[8].numel();
  TORCH_CHECK(ts[6].numel() == a.T + 1 && ts[7].numel() == a.S && a.S <= 8 * a.S2b + (a.sal ? 0 : a.S) &&
              (!a.sal || s1w.size(0) == a.N), "arbq: salient index tensors disagree with the planes");
  a.vals = vals.data_ptr();
  switch (vals.scalar_type()) {
    case torch::kFloat: a.vdtype = 0; break;
    case torch::kHalf: a.vdtype = 1; break;
    case torch::kBFloat16: a.vdtype = 2; break;
    case torch::kFloat8_e4m3fn: a.vdtype = 3; init_fp8_lut(); break;
    default: TORCH_CHECK(false, "arbq: unsupported values dtype");
  }
  a.vscale = static_cast<float>(vscale);
  for (int s = 0; s < NSLOT; ++s) a.pos[s] = pos.data_ptr<int32_t>()[s];
  a.cs = a.rc ? ts[11].data_ptr<float>() : nullptr;
  return a;
}

std::vector<int32_t> compact_index(const Layer& a) {
  std::vector<int32_t> cidx(a.K, -1);
  for (int64_t p = 0; p < a.S; ++p) cidx[a.sidx[p]] = static_cast<int32_t>(p);
  return cidx;
}

// Rows r0:r1 of W as float32 or bfloat16 [r1 - r0, K]. mode 0: scalar code, else AVX-512 where compiled.
// out: a preallocated float32 or bfloat16 [>= r1 - r0, K] contiguous buffer, or an empty tensor to allocate a
// float32 one. bfloat16: every value rounded to nearest even from the fp32 dequantization (the prefill operand).
torch::Tensor dequant(std::vector<torch::Tensor> ts, double vscale, int64_t K, int64_t B, std::vector<bool> flags,
                      int64_t r0, int64_t r1, int64_t mode, torch::Tensor out) {
  const Layer a = make_layer(ts, vscale, K, B, flags);
  if (out.numel() == 0) out = torch::empty({r1 - r0, K}, torch::kFloat);
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((bf16 || out.scalar_type() == torch::kFloat) && out.is_contiguous() && out.dim() == 2 &&
              out.size(1) == K && out.size(0) >= r1 - r0, "arbq: dequant output buffer must be float32 or bfloat16 [>= rows, K]");
  auto* o16 = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr()) : nullptr;
#if ARBQ_AVX512
  if (mode > 0 && B % 16 == 0) {
    dequant_avx512(a, r0, r1, bf16 ? nullptr : out.data_ptr<float>(), o16);
    return out;
  }
#endif
  const auto cidx = compact_index(a);
  if (!bf16) {
    dequant_scalar(a, cidx.data(), r0, r1, out.data_ptr<float>());
    return out;
  }
  std::vector<float> tmp((r1 - r0) * K);
  dequant_scalar(a, cidx.data(), r0, r1, tmp.data());
  for (int64_t j = 0; j < (r1 - r0) * K; ++j) o16[j] = bf16_bits(tmp[j]);
  return out;
}

// y [M, N] = x [M, K] @ W^T, one x row at a time. mode: 0 scalar, 1 fp32 lanes, 2 fp16 lanes if possible.
torch::Tensor gemv(torch::Tensor x, std::vector<torch::Tensor> ts, double vscale, int64_t B,
                   std::vector<bool> flags, int64_t mode) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2, "x: float32 [M, K]");
  const int64_t K = x.size(1);
  const Layer a = make_layer(ts, vscale, K, B, flags);
  auto y = torch::empty({x.size(0), a.N}, torch::kFloat);
  const bool vec = ARBQ_AVX512 && mode > 0 && B % 16 == 0;
  const std::vector<int32_t> cidx = vec ? std::vector<int32_t>() : compact_index(a);
  for (int64_t m = 0; m < x.size(0); ++m) {
    const float* xm = x.data_ptr<float>() + m * K;
    float* ym = y.data_ptr<float>() + m * a.N;
    if (!vec) { gemv_scalar(a, cidx.data(), xm, ym); continue; }
#if ARBQ_AVX512
    gemv_avx512(a, xm, ym, mode);
#endif
  }
  return y;
}

#if ARBQ_AVX512
// y [M, N] = x [M, K] @ W^T by table lookup (binary_gemv_lut_avx512.cpp); tensors from arbq.kernels.cpu.prepare_lut.
Lut make_lut(const std::vector<torch::Tensor>& ts, int64_t K, int64_t N, int64_t B, const std::vector<bool>& flags) {
  // ts: codes [N16, KQ, 16] u8, sign2 [N16, S] i16, sidx [S] i32, soff [T+1] i32, vt [N16, T, V, 16], pos [10] i32, cs [4, K]
  // [, keep [N16, KB, 16] u8: N:M, RC schemes]
  TORCH_CHECK((ts.size() == 7 || ts.size() == 8) && flags.size() == 2, "arbq: bad kernel arguments");
  for (const auto& t : ts) TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "arbq: tensors must be contiguous CPU");
  const auto &codes = ts[0], &s2w = ts[1], &sidx = ts[2], &soff = ts[3], &vt = ts[4], &pos = ts[5], &cs = ts[6];
  Lut L{};
  L.rc = flags[0]; L.cgb = flags[1];
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 3 && codes.size(2) == 16, "codes: uint8 [N16, KQ, 16]");
  L.N16 = codes.size(0); L.KQ = codes.size(1); L.B = B; L.T = (K + B - 1) / B; L.S = sidx.numel();
  TORCH_CHECK(B % 4 == 0 && L.KQ == (K + 3) / 4 && L.N16 == (N + 15) / 16, "arbq: lut codes disagree with x / N");
  TORCH_CHECK(vt.dim() == 4 && vt.size(0) == L.N16 && vt.size(1) == L.T && vt.size(3) == 16 && vt.size(2) <= 10,
              "arbq: lut values must be [N16, T, V, 16]");
  TORCH_CHECK(vt.scalar_type() == torch::kHalf || vt.scalar_type() == torch::kFloat, "arbq: lut values fp16 or fp32");
  TORCH_CHECK(s2w.scalar_type() == torch::kInt16 && s2w.numel() == L.N16 * L.S, "arbq: lut sign2 words [N16, S] int16");
  TORCH_CHECK(soff.numel() == L.T + 1 && pos.numel() == NSLOT && (!L.rc || cs.numel() == 4 * K), "arbq: lut index tensors");
  const int32_t* si = sidx.data_ptr<int32_t>();
  for (int64_t p = 0; p < L.S; ++p) TORCH_CHECK(si[p] >= 0 && si[p] < K, "arbq: lut salient index out of range");
  L.V = vt.size(2); L.vhalf = vt.scalar_type() == torch::kHalf; L.vt = vt.data_ptr();
  L.codes = codes.data_ptr<uint8_t>();
  L.s2w = reinterpret_cast<const uint16_t*>(ptr<int16_t>(s2w));
  L.sidx = ptr<int32_t>(sidx); L.soff = soff.data_ptr<int32_t>();
  for (int s = 0; s < NSLOT; ++s) L.pos[s] = pos.data_ptr<int32_t>()[s];
  L.cs = L.rc ? cs.data_ptr<float>() : nullptr;
  if (ts.size() == 8) {
    const auto& keep = ts[7];
    TORCH_CHECK(L.rc, "arbq: the N:M lookup runs RC schemes only");
    TORCH_CHECK(keep.scalar_type() == torch::kUInt8 && keep.dim() == 3 && keep.size(0) == L.N16 &&
                keep.size(1) == (K + 7) / 8 && keep.size(2) == 16, "arbq: lut keep bytes must be uint8 [N16, ceil(K/8), 16]");
    L.keep = keep.data_ptr<uint8_t>();
    L.KB = keep.size(1);
  }
  return L;
}

// table_bits 16: int16 tables where compiled (ARBQ_LUT16) and B % 8 == 0, else fp32 (32).
torch::Tensor gemv_lut_op(torch::Tensor x, std::vector<torch::Tensor> ts, int64_t N, int64_t B, std::vector<bool> flags,
                          int64_t table_bits) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2, "x: float32 [M, K]");
  TORCH_CHECK(table_bits == 16 || table_bits == 32, "arbq: table_bits must be 16 or 32");
  const int64_t K = x.size(1);
  const Lut L = make_lut(ts, K, N, B, flags);
  const bool i16 = ARBQ_LUT16 && table_bits == 16 && B % 8 == 0;
  auto y = torch::empty({x.size(0), N}, torch::kFloat);
  for (int64_t m = 0; m < x.size(0); ++m) gemv_lut(L, x.data_ptr<float>() + m * K, K, N, y.data_ptr<float>() + m * N, i16);
  return y;
}

// The sign scheme's lookup (binary_gemv_sign_avx512.cpp) over the binary layout's own tensors: ts = sign1
// [N, KB] uint8, values [N16, T, V, 16] fp16 / fp32 (rows last), lanes [2] int32 (α, μ; kZeroLane: none).
SignLut make_sign_lut(const std::vector<torch::Tensor>& ts, int64_t K, int64_t N, int64_t B) {
  TORCH_CHECK(ts.size() == 3, "arbq: bad sign kernel arguments");
  for (const auto& t : ts) TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "arbq: tensors must be contiguous CPU");
  const auto &s1 = ts[0], &vt = ts[1], &lanes = ts[2];
  SignLut L{};
  L.N = N; L.K = K; L.KB = (K + 7) / 8; L.N16 = (N + 15) / 16; L.B = B; L.T = (K + B - 1) / B; L.KD = (L.KB + 3) / 4;
  TORCH_CHECK(B % 32 == 0, "arbq: the sign lookup needs a block size that is a multiple of 32");
  TORCH_CHECK(s1.scalar_type() == torch::kUInt8 && s1.dim() == 2 && s1.size(0) == N && s1.size(1) == L.KB,
              "arbq: sign plane must be uint8 [N, ceil(K/8)]");
  TORCH_CHECK(vt.dim() == 4 && vt.size(0) == L.N16 && vt.size(1) == L.T && vt.size(3) == 16 && vt.size(2) <= 10 &&
              (vt.scalar_type() == torch::kHalf || vt.scalar_type() == torch::kFloat), "arbq: sign values must be [N16, T, V, 16] fp16 / fp32");
  TORCH_CHECK(lanes.scalar_type() == torch::kInt && lanes.numel() == 2, "arbq: sign value lanes must be int32 [2]");
  L.s1 = s1.data_ptr<uint8_t>(); L.vt = vt.data_ptr(); L.vhalf = vt.scalar_type() == torch::kHalf; L.V = vt.size(2);
  L.a = lanes.data_ptr<int32_t>()[0]; L.m = lanes.data_ptr<int32_t>()[1];
  TORCH_CHECK((L.a == kZeroLane || (0 <= L.a && L.a < L.V)) && (L.m == kZeroLane || (0 <= L.m && L.m < L.V)),
              "arbq: sign value lanes out of range");
  return L;
}

// y [M, N] = x [M, K] @ W^T for the sign scheme by table lookup; table_bits 16 (int16 where compiled) or 32.
torch::Tensor gemv_sign_op(torch::Tensor x, std::vector<torch::Tensor> ts, int64_t N, int64_t B, int64_t table_bits) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2, "x: float32 [M, K]");
  TORCH_CHECK(table_bits == 16 || table_bits == 32, "arbq: table_bits must be 16 or 32");
  const int64_t K = x.size(1);
  const SignLut L = make_sign_lut(ts, K, N, B);
  auto y = torch::empty({x.size(0), N}, torch::kFloat);
  for (int64_t m = 0; m < x.size(0); ++m) gemv_sign(L, x.data_ptr<float>() + m * K, y.data_ptr<float>() + m * N, table_bits == 16);
  return y;
}

// Ŵᵀ of row groups g0:g1 into out (float32 or bfloat16 [K, 16 (g1 - g0)], contiguous): dequant_lut_rows.
torch::Tensor dequant_lut_op(std::vector<torch::Tensor> ts, int64_t K, int64_t N, int64_t B, std::vector<bool> flags,
                             int64_t g0, int64_t g1, torch::Tensor out) {
  const Lut L = make_lut(ts, K, N, B, flags);
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(0 <= g0 && g0 <= g1 && g1 <= L.N16, "arbq: row groups out of range");
  TORCH_CHECK((bf16 || out.scalar_type() == torch::kFloat) && out.is_contiguous() && out.dim() == 2 &&
              out.size(0) == K && out.size(1) == 16 * (g1 - g0), "arbq: lut dequant output must be float32 or bfloat16 [K, 16 groups]");
  float* o32 = bf16 ? nullptr : out.data_ptr<float>();
  auto* o16 = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr()) : nullptr;
  if (L.rc) L.cgb ? dequant_lut_rows<true, true>(L, K, g0, g1, o32, o16) : dequant_lut_rows<true, false>(L, K, g0, g1, o32, o16);
  else L.cgb ? dequant_lut_rows<false, true>(L, K, g0, g1, o32, o16) : dequant_lut_rows<false, false>(L, K, g0, g1, o32, o16);
  return out;
}
#endif

// binary_nm's compact plane [N, Lb] expanded by its keep plane [N, Kb] (pruned bits 0): uint8 [N, Kb], the
// planes' own packing (expand_row, one pdep per 64 columns); n:m as in the layout.
torch::Tensor nm_expand(torch::Tensor compact, torch::Tensor keep, int64_t K, int64_t n_keep, int64_t m) {
  TORCH_CHECK(compact.scalar_type() == torch::kUInt8 && keep.scalar_type() == torch::kUInt8 && compact.dim() == 2 &&
              keep.dim() == 2 && compact.size(0) == keep.size(0) && keep.size(1) == (K + 7) / 8 &&
              compact.size(1) <= keep.size(1) && compact.is_contiguous() && keep.is_contiguous(),
              "arbq: nm_expand needs uint8 compact [N, Lb] and keep [N, ceil(K/8)] planes");
  TORCH_CHECK(1 <= n_keep && n_keep <= m && m <= 64, "arbq: bad n:m");
  const int64_t N = keep.size(0), Kb = keep.size(1), Lb = compact.size(1);
  const int step = 64 % m == 0 ? static_cast<int>(64 / m * n_keep) : 0;
  auto out = torch::zeros({N, Kb}, torch::kUInt8);
  const uint8_t *src = compact.data_ptr<uint8_t>(), *kp = keep.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) expand_row(src + i * Lb, Lb, kp + i * Kb, Kb, dst + i * Kb, step, K / 64);
  });
  return out;
}

std::string features() {
#if defined(__AVX512BF16__)
  const bool bf16 = ARBQ_AVX512;
#else
  const bool bf16 = false;
#endif
  return std::string(ARBQ_AVX512 ? "avx512" : "scalar") + (ARBQ_FP16 ? "+fp16" : "") + (bf16 ? "+bf16" : "") +
         (ARBQ_LUT16 ? "+lut16" : "");
}


// BinaryLinear's batch-1 fast path: one layer's decode GEMV bound once (tensors checked and the Lut / Layer built
// at binding), so a call costs the kernel plus about a microsecond, where the general Python path costs ~10 µs,
// more than the kernel itself at 576-wide shapes. kind 1: the lookup GEMV (gemv_lut_op), 2: the sign scheme's
// lookup (gemv_sign_op), both with table_bits 16 / 32; 0: the masked-add GEMV in lane mode `mode` (gemv).
// call(x) returns None whenever the binding may be stale or does not apply, and the caller takes its general path: a watched tensor changed in place (its version counter), a watched
// environment variable differs from its value at binding, or x is not [..., K] float32 / bfloat16 / float16 on
// the CPU with 1 .. max_rows rows. Else y [..., N] = fp32(x) @ W^T rounded to x's dtype, plus the bias in x's
// dtype: the general path's operations in its order, so the same bits.
class DecodeCall {
 public:
  DecodeCall(int64_t kind, std::vector<torch::Tensor> ts, double vscale, int64_t K, int64_t N, int64_t B,
             std::vector<bool> flags, int64_t table_bits, int64_t mode, std::optional<torch::Tensor> bias,
             std::vector<torch::Tensor> watch, std::vector<std::string> env, int64_t max_rows)
      : ts_(std::move(ts)), watch_(std::move(watch)), K_(K), N_(N), max_rows_(max_rows), kind_(kind) {
    TORCH_CHECK(0 <= kind && kind <= 2 && (kind == 0 || table_bits == 16 || table_bits == 32),
                "arbq: kind must be 0 (masked adds), 1 (lookup) or 2 (sign lookup, table_bits 16 or 32)");
    if (bias) bias_ = *bias;
    // inference-mode tensors keep no version counter (-1: not checked; BinaryLinear unbinds on load_state_dict)
    for (const auto& t : watch_) versions_.push_back(t.is_inference() ? -1 : t._version());
    for (auto& name : env) {
      const char* v = std::getenv(name.c_str());
      env_.push_back({std::move(name), v != nullptr, v ? v : ""});
    }
    if (kind > 0) {
#if ARBQ_AVX512
      if (kind == 1) lut_ = make_lut(ts_, K, N, B, flags);
      else sign_ = make_sign_lut(ts_, K, N, B);
      i16_ = ARBQ_LUT16 && table_bits == 16 && (kind == 2 || B % 8 == 0);
#else
      TORCH_CHECK(false, "arbq: this build has no lookup kernel");
#endif
    } else {
      layer_ = make_layer(ts_, vscale, K, B, flags);
      TORCH_CHECK(layer_.N == N, "arbq: packed rows disagree with N");
      vec_ = ARBQ_AVX512 && mode > 0 && B % 16 == 0;
      mode_ = mode;
      if (!vec_) cidx_ = compact_index(layer_);
    }
  }

  std::optional<torch::Tensor> operator()(const torch::Tensor& x) const {
    const auto dt = x.scalar_type();
    if (!x.device().is_cpu() || x.dim() < 1 || x.size(-1) != K_ ||
        (dt != torch::kFloat && dt != torch::kBFloat16 && dt != torch::kHalf))
      return std::nullopt;
    const int64_t M = x.numel() / K_;
    if (M < 1 || M > max_rows_) return std::nullopt;
    for (size_t i = 0; i < watch_.size(); ++i)
      if (versions_[i] >= 0 && watch_[i]._version() != versions_[i]) return std::nullopt;
    for (const auto& e : env_) {
      const char* v = std::getenv(e.name.c_str());
      if ((v != nullptr) != e.set || (v != nullptr && e.value != v)) return std::nullopt;
    }
    const bool plain = dt == torch::kFloat && x.is_contiguous();     // the decode case: no copy of x
    const torch::Tensor xf = plain ? x : x.to(torch::kFloat).contiguous();
    auto sizes = x.sizes().vec();
    sizes.back() = N_;
    auto y = torch::empty(sizes, torch::kFloat);
    const float* xp = xf.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) row(xp + m * K_, yp + m * N_);
    if (dt != torch::kFloat) y = y.to(dt);
    if (bias_.defined()) y = y + bias_.to(dt);
    return y;
  }

 private:
  struct Env { std::string name; bool set; std::string value; };

  void row(const float* x, float* y) const {
    if (kind_ > 0) {
#if ARBQ_AVX512
      if (kind_ == 1) gemv_lut(lut_, x, K_, N_, y, i16_);
      else gemv_sign(sign_, x, y, i16_);
#endif
      return;
    }
#if ARBQ_AVX512
    if (vec_) { gemv_avx512(layer_, x, y, mode_); return; }
#endif
    gemv_scalar(layer_, cidx_.data(), x, y);
  }

  std::vector<torch::Tensor> ts_, watch_;
  std::vector<int64_t> versions_;
  std::vector<Env> env_;
  torch::Tensor bias_;
  int64_t K_, N_, max_rows_, kind_, mode_ = 0;
  bool i16_ = false, vec_ = false;
  Layer layer_{};
#if ARBQ_AVX512
  Lut lut_{};
  SignLut sign_{};
#endif
  std::vector<int32_t> cidx_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x @ W^T from packed bits (x rows looped)");
  m.def("dequant", &dequant, "rows r0:r1 of W as float32 or bfloat16 (into out)");
#if ARBQ_AVX512
  m.def("gemv_lut", &gemv_lut_op, "y = x @ W^T by table lookup over the kernel layout (x rows looped)");
  m.def("gemv_sign", &gemv_sign_op, "y = x @ W^T for the sign scheme by table lookup over its own sign plane");
  m.def("dequant_lut", &dequant_lut_op, "W^T of row groups g0:g1 from the kernel layout as float32 or bfloat16 (into out)");
#endif
  m.def("nm_expand", &nm_expand, "binary_nm: a compact plane expanded by the keep plane (pruned bits 0)");
  pybind11::class_<DecodeCall>(m, "DecodeCall", "one layer's batch-1 GEMV bound once: call(x) -> y or None")
      .def(pybind11::init<int64_t, std::vector<torch::Tensor>, double, int64_t, int64_t, int64_t, std::vector<bool>,
                          int64_t, int64_t, std::optional<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<std::string>, int64_t>())
      .def("__call__", &DecodeCall::operator());
  m.def("features", &features, "compiled paths: scalar | avx512 | avx512+fp16");
}
