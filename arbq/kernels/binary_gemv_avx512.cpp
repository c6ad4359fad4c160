// AVX-512 part of binary_gemv.cpp (#included there inside `#if ARBQ_AVX512`, in its namespace):
// pass-1 lane types, the row kernel, per-call preparation. The dequantization kernel for the batched
// path is in binary_dequant_avx512.cpp. Kept as .cpp files so the package data (kernels/*.cpp) ships them.


struct Call {                                   // one x row, prepared once per call
  const void *z00, *z10;                        // [Kp] pass-1 lanes (fp32 or fp16)
  const float *xs, *zs00, *zs01, *zs10, *zs11;  // [16 W] salient x / z, aligned like the salient words
  const float* coef;                            // [T, 16] row-invariant term of each value lane
  __m512i a00, a01, a101, a111, a102, a112, m00, m01, m10, m11, diff;
};

inline __m512 load_vals_vec(const Layer& a, int64_t i, int64_t t) {
  const int64_t off = (i * a.T + t) * a.V;
  const __mmask16 m = static_cast<__mmask16>((1u << a.V) - 1);
  if (a.vdtype == 1) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(a.vals) + off));
  if (a.vdtype == 0) return _mm512_maskz_loadu_ps(m, static_cast<const float*>(a.vals) + off);
  if (a.vdtype == 2)
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(a.vals) + off)), 16));
  alignas(64) float v[16];
  load_vals(a, i, t, v);
  return _mm512_load_ps(v);
}

inline __m512 madd(__m512 acc, __mmask16 m, __m512 z) { return _mm512_mask_add_ps(acc, m, acc, z); }
inline __m512 bc(__m512i lane, __m512 v) { return _mm512_permutexvar_ps(lane, v); }
inline __mmask16 word16(const uint8_t* p) { return _load_mask16(reinterpret_cast<__mmask16*>(const_cast<uint8_t*>(p))); }
// The first min(n, 16) lanes (n > 0): the mask of a 16-wide step that may run past the end of its range.
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }

// Pass-1 lane types: fp32 (16 columns per mask) and fp16 (32 columns per mask, fp32 at block end).
struct F32 {
  using V = __m512;
  using M = __mmask16;
  static constexpr int kCols = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const void* z, int64_t c) { return _mm512_loadu_ps(static_cast<const float*>(z) + 16 * c); }
  static M mask(const uint8_t* p) { return word16(p); }
  static M mask_bits(uint32_t m) { return _cvtu32_mask16(m); }
  static V add(V acc, M m, V z) { return _mm512_mask_add_ps(acc, m, acc, z); }
  static V add(V acc, V z) { return _mm512_add_ps(acc, z); }
  static V neg(V z, M m) { return _mm512_mask_sub_ps(z, m, _mm512_setzero_ps(), z); }  // bit 1: -z
  static __m512 f32(V v) { return v; }
};
#if ARBQ_FP16
struct F16 {
  using V = __m512h;
  using M = __mmask32;
  static constexpr int kCols = 32;
  static V zero() { return _mm512_setzero_ph(); }
  static V load(const void* z, int64_t c) { return _mm512_loadu_ph(static_cast<const _Float16*>(z) + 32 * c); }
  static M mask(const uint8_t* p) { return _load_mask32(reinterpret_cast<__mmask32*>(const_cast<uint8_t*>(p))); }
  static M mask_bits(uint32_t m) { return _cvtu32_mask32(m); }
  static V add(V acc, M m, V z) { return _mm512_mask_add_ph(acc, m, acc, z); }
  static V add(V acc, V z) { return _mm512_add_ph(acc, z); }
  static V neg(V z, M m) { return _mm512_mask_sub_ph(z, m, _mm512_setzero_ph(), z); }
  static __m512 f32(V v) {
    const __m512 w = _mm512_castph_ps(v);
    return _mm512_add_ps(_mm512_cvtxph_ps(_mm256_castps_ph(_mm512_castps512_ps256(w))),
                         _mm512_cvtxph_ps(_mm256_castps_ph(_mm512_extractf32x8_ps(w, 1))));
  }
};
#endif

#if ARBQ_FP16
// A row-block's values as fp16: straight from the tensor when stored as fp16, else converted into buf.
inline const _Float16* value_ptr16(const Layer& a, int64_t i, int64_t t, __m512 vals32, _Float16* buf) {
  if (a.vdtype == 1) return static_cast<const _Float16*>(a.vals) + (i * a.T + t) * a.V;
  _mm256_store_si256(reinterpret_cast<__m256i*>(buf), _mm256_castph_si256(_mm512_cvtxps_ph(vals32)));
  return buf;
}
#endif

// Mask of pass-1 chunk c of a plane row; TAIL: the row's last bytes, fewer than the chunk needs.
template <class L, bool TAIL>
inline typename L::M chunk_mask(const uint8_t* row, int64_t c, int64_t kb) {
  constexpr int nb = L::kCols / 8;
  if (!TAIL) return L::mask(row + nb * c);
  uint32_t m = 0;
  for (int64_t b = nb * c; b < kb; ++b) m |= static_cast<uint32_t>(row[b]) << (8 * (b - nb * c));
  return L::mask_bits(m);
}

// Rows i0..i0+R-1. Signed sums, with t = -s z ("neg" under the sign mask):
//   pass 1 (all columns):  P0 = sum t0, P0g = sum_g t0, P1g = sum_g t1, Xg = sum_g x   (t_g = -s1 z_g0)
//     -> sum_{!g} s1 z00 = -(P0 - P0g), sum_g s1 z10 = -P1g, sum_{!g} x = TX - Xg, sum_g x = Xg
//   pass 2 (salient columns, z chosen by the group bit): S1a = sum u1, S1g = sum_g u1, S2a, S2g (u_o = -s_o z_go),
//     SXg = sum_g x; the kind-1 value minus the kind-0 one (dv) corrects what pass 1 counted.
// Without a group bit (sign) pass 1 uses A = sum_{s1} z00: sum s1 z00 = 2A - TZ. Row-invariant terms
// (TX, TZ, TSX) are in c.coef.
// NM (binary_nm): sign / group rows expanded into scratch [2 R Kb] first; P0 and, for the means (!RC) or TZ
// (!GRP), XK = sum_keep x are masked by the keep row (pruned bits are 0 in the expanded planes, so every
// g- or s-masked sum already excludes them); pass 2 masks S1a, S2a, SXK = sum_{keep, salient} x by the
// aligned keep words. The row-invariant means / TZ terms of c.coef are 0 then; they enter per row here.
template <class L, int R, bool RC, bool GRP, bool CGB, bool SAL, bool NM>
void rows_kernel(const Layer& a, const Call& c, int64_t i0, float* y_out, uint8_t* scratch) {
  constexpr bool XSUM = NM && (!RC || !GRP);
  __m512 y[R];
  const uint8_t *s1r[R], *gr[R], *s1w[R], *gw[R], *s2w[R], *kr[R], *kw[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    y[r] = _mm512_setzero_ps();
    if constexpr (NM) {
      kr[r] = a.keep + (i0 + r) * a.Kb;
      kw[r] = SAL ? a.kw + (i0 + r) * 2 * a.W : nullptr;
      expand_row(a.s1 + (i0 + r) * a.Lb, a.Lb, kr[r], a.Kb, scratch + r * a.Kb, a.step, a.K / 64);
      s1r[r] = scratch + r * a.Kb;
      if (GRP) expand_row(a.grp + (i0 + r) * a.Lb, a.Lb, kr[r], a.Kb, scratch + (R + r) * a.Kb, a.step, a.K / 64);
      gr[r] = GRP ? scratch + (R + r) * a.Kb : nullptr;
    } else {
      kr[r] = kw[r] = nullptr;
      s1r[r] = a.s1 + (i0 + r) * a.Kb;
      gr[r] = GRP ? a.grp + (i0 + r) * a.Kb : nullptr;
    }
    s1w[r] = SAL ? a.s1w + (i0 + r) * 2 * a.W : nullptr;
    gw[r] = CGB ? a.gw + (i0 + r) * 2 * a.W : nullptr;
    s2w[r] = SAL ? a.s2w + (i0 + r) * 2 * a.W : nullptr;
  }
  const int64_t cpb = a.B / L::kCols, nch = (a.K + L::kCols - 1) / L::kCols, nfull = a.Kb / (L::kCols / 8);
  for (int64_t t = 0; t < a.T; ++t) {
    // ---- pass 1
    typename L::V P0[R], P0g[R], P1g[R], Xg[R], XK[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) P0[r] = P0g[r] = P1g[r] = Xg[r] = XK[r] = L::zero();
    const int64_t c0 = t * cpb, c1 = std::min(c0 + cpb, nch);
    auto chunk = [&](int64_t ci, auto tail) {
      constexpr bool kTail = decltype(tail)::value;
      const typename L::V z0 = L::load(c.z00, ci), z1 = RC ? L::load(c.z10, ci) : z0;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const typename L::M ms = chunk_mask<L, kTail>(s1r[r], ci, a.Kb);
        typename L::M mk{};
        if constexpr (NM) mk = chunk_mask<L, kTail>(kr[r], ci, a.Kb);
        if constexpr (XSUM) XK[r] = L::add(XK[r], mk, z0);
        if (!GRP) { P0[r] = L::add(P0[r], ms, z0); continue; }
        const typename L::M mg = chunk_mask<L, kTail>(gr[r], ci, a.Kb);
        const typename L::V t0 = L::neg(z0, ms), t1 = RC ? L::neg(z1, ms) : t0;
        P0[r] = NM ? L::add(P0[r], mk, t0) : L::add(P0[r], t0);
        P1g[r] = L::add(P1g[r], mg, t1);
        if (RC) P0g[r] = L::add(P0g[r], mg, t0);
        else Xg[r] = L::add(Xg[r], mg, z0);
      }
    };
    for (int64_t ci = c0; ci < std::min(c1, nfull); ++ci) chunk(ci, std::false_type{});
    for (int64_t ci = std::max(c0, nfull); ci < c1; ++ci) chunk(ci, std::true_type{});
    const __m512 coef = _mm512_loadu_ps(c.coef + 16 * t);
    __m512 vals[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      vals[r] = load_vals_vec(a, i0 + r, t);
      if (!NM && (!RC || !GRP)) y[r] = _mm512_fmadd_ps(vals[r], coef, y[r]);  // row-invariant terms (means, TZ)
      if constexpr (XSUM) {   // binary_nm: mu00 sum_keep x (means), - a00 sum_keep z (sign trick without groups)
        __m512 cf = RC ? _mm512_setzero_ps() : bc(c.m00, vals[r]);
        if (!GRP) cf = _mm512_sub_ps(cf, bc(c.a00, vals[r]));
        y[r] = _mm512_fmadd_ps(cf, L::f32(XK[r]), y[r]);
      }
#if ARBQ_FP16
      if constexpr (L::kCols == 32) {  // fp16 lanes: values applied in fp16, one conversion per row-block
        alignas(64) _Float16 vbuf[16];
        const _Float16* vh = value_ptr16(a, i0 + r, t, vals[r], vbuf);
        __m512h yh;
        if (GRP) {
          const __m512h p0g = RC ? P0g[r] : P1g[r];
          yh = _mm512_mul_ph(_mm512_set1_ph(vh[a.pos[A00]]), _mm512_sub_ph(p0g, P0[r]));
          yh = _mm512_fnmadd_ph(_mm512_set1_ph(vh[a.pos[A01]]), P1g[r], yh);
          if (!RC) yh = _mm512_fmadd_ph(_mm512_set1_ph(static_cast<_Float16>(vh[a.pos[M01]] - vh[a.pos[M00]])), Xg[r], yh);
        } else {
          yh = _mm512_mul_ph(_mm512_set1_ph(vh[a.pos[A00]]), _mm512_add_ph(P0[r], P0[r]));
        }
        y[r] = _mm512_add_ps(y[r], F16::f32(yh));
        continue;
      }
#endif
      if (GRP) {
        const __m512 p0 = L::f32(P0[r]), p1g = L::f32(P1g[r]), p0g = RC ? L::f32(P0g[r]) : p1g;
        y[r] = _mm512_fmadd_ps(bc(c.a00, vals[r]), _mm512_sub_ps(p0g, p0), y[r]);
        y[r] = _mm512_fnmadd_ps(bc(c.a01, vals[r]), p1g, y[r]);
        if (!RC) y[r] = _mm512_fmadd_ps(_mm512_sub_ps(bc(c.m01, vals[r]), bc(c.m00, vals[r])), L::f32(Xg[r]), y[r]);
      } else {
        const __m512 p0 = L::f32(P0[r]);
        y[r] = _mm512_fmadd_ps(bc(c.a00, vals[r]), _mm512_add_ps(p0, p0), y[r]);
      }
    }
    if (!SAL) continue;
    // ---- pass 2: salient columns of block t, 16 per word
    const int64_t w0 = a.woff[t], w1 = a.woff[t + 1];
    if (w1 == w0) continue;
    __m512 S1a[R], S1g[R], S2a[R], S2g[R], SXg[R], SXK[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) S1a[r] = S1g[r] = S2a[r] = S2g[r] = SXg[r] = SXK[r] = _mm512_setzero_ps();
    for (int64_t w = w0; w < w1; ++w) {
      const __m512 x00 = _mm512_loadu_ps((RC ? c.zs00 : c.xs) + 16 * w);
      const __m512 x01 = RC ? _mm512_loadu_ps(c.zs01 + 16 * w) : x00;
      const __m512 x10 = RC ? _mm512_loadu_ps(c.zs10 + 16 * w) : x00;
      const __m512 x11 = RC ? _mm512_loadu_ps(c.zs11 + 16 * w) : x00;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __mmask16 m1 = word16(s1w[r] + 2 * w), m2 = word16(s2w[r] + 2 * w);
        const __mmask16 mg = CGB ? word16(gw[r] + 2 * w) : 0;
        const __m512 z1 = CGB && RC ? _mm512_mask_blend_ps(mg, x00, x10) : x00;
        const __m512 z2 = CGB && RC ? _mm512_mask_blend_ps(mg, x01, x11) : x01;
        const __m512 u1 = F32::neg(z1, m1), u2 = F32::neg(z2, m2);
        if constexpr (NM) {
          const __mmask16 mk = word16(kw[r] + 2 * w);
          S1a[r] = madd(S1a[r], mk, u1);
          S2a[r] = madd(S2a[r], mk, u2);
          if (!RC) SXK[r] = madd(SXK[r], mk, x00);
        } else {
          S1a[r] = _mm512_add_ps(S1a[r], u1);
          S2a[r] = _mm512_add_ps(S2a[r], u2);
        }
        if (CGB) {
          S1g[r] = madd(S1g[r], mg, u1);
          S2g[r] = madd(S2g[r], mg, u2);
          if (!RC) SXg[r] = madd(SXg[r], mg, x00);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      // dv: a kind-1 value minus the kind-0 value its columns were counted with in pass 1; values are
      // broadcast from a stack copy (a load each) rather than by lane permutes (p5 uops)
      alignas(64) float v[16], d[16];
      _mm512_store_ps(v, vals[r]);
      _mm512_store_ps(d, _mm512_sub_ps(vals[r], bc(c.diff, vals[r])));
      y[r] = _mm512_fmadd_ps(_mm512_set1_ps(d[a.pos[A10_1]]), _mm512_sub_ps(S1g[r], S1a[r]), y[r]);
      y[r] = _mm512_fmadd_ps(_mm512_set1_ps(v[a.pos[A10_2]]), _mm512_sub_ps(S2g[r], S2a[r]), y[r]);
      if (NM && !RC) y[r] = _mm512_fmadd_ps(_mm512_set1_ps(d[a.pos[M10]]), SXK[r], y[r]);  // (mu10 - mu00) sum
      if (CGB) {
        y[r] = _mm512_fnmadd_ps(_mm512_set1_ps(d[a.pos[A11_1]]), S1g[r], y[r]);
        y[r] = _mm512_fnmadd_ps(_mm512_set1_ps(v[a.pos[A11_2]]), S2g[r], y[r]);
        if (!RC) y[r] = _mm512_fmadd_ps(_mm512_set1_ps(d[a.pos[M11]] - d[a.pos[M10]]), SXg[r], y[r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) y_out[i0 + r] = _mm512_reduce_add_ps(y[r]) * a.vscale;
}

template <class L, bool RC, bool GRP, bool CGB, bool SAL, bool NM>
void gemv_rows(const Layer& a, const Call& c, float* y) {
  constexpr int R = 4;
  const int64_t groups = a.N / R;
  at::parallel_for(0, groups, 1, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> scratch(NM ? 2 * R * a.Kb : 0);    // expanded sign / group rows (binary_nm)
    for (int64_t g = b; g < e; ++g) rows_kernel<L, R, RC, GRP, CGB, SAL, NM>(a, c, g * R, y, scratch.data());
  });
  std::vector<uint8_t> scratch(NM ? 2 * a.Kb : 0);
  for (int64_t i = groups * R; i < a.N; ++i) rows_kernel<L, 1, RC, GRP, CGB, SAL, NM>(a, c, i, y, scratch.data());
}

template <class L, bool NM>
void gemv_schemes(const Layer& a, const Call& c, float* y) {
  if (!a.sal) {
    TORCH_CHECK(!a.grp_on && !a.rc, "arbq: unsupported scheme without salient columns");
    gemv_rows<L, false, false, false, false, NM>(a, c, y);
  } else if (a.rc) {
    a.cgb ? gemv_rows<L, true, true, true, true, NM>(a, c, y) : gemv_rows<L, true, true, false, true, NM>(a, c, y);
  } else {
    a.cgb ? gemv_rows<L, false, true, true, true, NM>(a, c, y) : gemv_rows<L, false, true, false, true, NM>(a, c, y);
  }
}

template <class L>
void gemv_dispatch(const Layer& a, const Call& c, float* y) {
  a.nm ? gemv_schemes<L, true>(a, c, y) : gemv_schemes<L, false>(a, c, y);
}

// Per-call preparation of one x row, then the rows. mode 2: pass 1 in fp16 lanes when x's range allows;
// then z is rounded to fp16 once, and every sum below uses the rounded values, so the sign trick's
// differences stay consistent.
void gemv_avx512(const Layer& a, const float* x, float* y, int64_t mode) {
  const int64_t K = a.K, kp = (K + 31) / 32 * 32, sw = 16 * a.W;
  std::vector<float> z(2 * kp, 0.f), xs(5 * sw, 0.f), coef(16 * a.T, 0.f);
  float *z00 = z.data(), *z10 = z00 + kp;
  float *xs0 = xs.data(), *zs00 = xs0 + sw, *zs01 = zs00 + sw, *zs10 = zs01 + sw, *zs11 = zs10 + sw;
  float zmax = 0.f;
  for (int64_t j = 0; j < K; ++j) {
    z00[j] = a.rc ? a.cs[j] * x[j] : x[j];
    z10[j] = a.rc ? a.cs[2 * K + j] * x[j] : x[j];
    zmax = std::max(zmax, std::max(std::fabs(z00[j]), std::fabs(z10[j])));
  }
  // each fp16 lane sums B/32 values per block: stay far from fp16's 65504
  const bool lanes16 = ARBQ_FP16 && mode == 2 && a.B % 32 == 0 && zmax * static_cast<float>(a.B / 32) < 16384.f;
#if ARBQ_FP16
  std::vector<_Float16> h(lanes16 ? 2 * kp : 0);
  for (size_t j = 0; j < h.size(); ++j) {
    h[j] = static_cast<_Float16>(z[j]);
    z[j] = static_cast<float>(h[j]);
  }
#endif
  for (int64_t p = 0; p < a.S; ++p) {
    const int64_t j = a.sidx[p], q = a.spos[p];
    xs0[q] = z00[j];
    if (a.rc) { zs00[q] = z00[j]; zs10[q] = z10[j]; zs01[q] = a.cs[K + j] * x[j]; zs11[q] = a.cs[3 * K + j] * x[j]; }
  }
  // coef lane of slot s = the row-invariant scalar its value multiplies (see rows_kernel)
  for (int64_t t = 0; t < a.T; ++t) {
    float tx = 0, tz = 0, tsx = 0;
    for (int64_t j = t * a.B; j < std::min((t + 1) * a.B, K); ++j) { tx += a.rc ? x[j] : z00[j]; tz += z00[j]; }
    for (int64_t q = 16 * a.woff[t]; q < 16 * a.woff[t + 1]; ++q) tsx += xs0[q];
    float* cf = coef.data() + 16 * t;
    if (a.nm) continue;              // binary_nm: these sums are per row (keep), taken in rows_kernel
    if (!a.grp_on) cf[a.pos[A00]] -= tz;
    if (!a.rc) { cf[a.pos[M00]] += tx - tsx; if (a.sal) cf[a.pos[M10]] += tsx; }
    cf[kZeroLane] = 0.f;
  }
  alignas(64) int32_t diff[16];
  for (int l = 0; l < 16; ++l) diff[l] = kZeroLane;
  const int pairs[4][2] = {{A10_1, A00}, {A11_1, A01}, {M10, M00}, {M11, M01}};
  for (const auto& pr : pairs)
    if (a.pos[pr[0]] != kZeroLane) diff[a.pos[pr[0]]] = a.pos[pr[1]];
  Call c;
  c.xs = xs0; c.zs00 = zs00; c.zs01 = zs01; c.zs10 = zs10; c.zs11 = zs11; c.coef = coef.data();
  c.a00 = _mm512_set1_epi32(a.pos[A00]); c.a01 = _mm512_set1_epi32(a.pos[A01]);
  c.a101 = _mm512_set1_epi32(a.pos[A10_1]); c.a111 = _mm512_set1_epi32(a.pos[A11_1]);
  c.a102 = _mm512_set1_epi32(a.pos[A10_2]); c.a112 = _mm512_set1_epi32(a.pos[A11_2]);
  c.m00 = _mm512_set1_epi32(a.pos[M00]); c.m01 = _mm512_set1_epi32(a.pos[M01]);
  c.m10 = _mm512_set1_epi32(a.pos[M10]); c.m11 = _mm512_set1_epi32(a.pos[M11]);
  c.diff = _mm512_load_si512(diff);
#if ARBQ_FP16
  if (lanes16) {
    c.z00 = h.data(); c.z10 = h.data() + kp;
    gemv_dispatch<F16>(a, c, y);
    return;
  }
#endif
  c.z00 = z00; c.z10 = z10;
  gemv_dispatch<F32>(a, c, y);
}
