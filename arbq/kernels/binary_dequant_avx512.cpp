// AVX-512 dequantization for the batched path (#included by binary_gemv.cpp inside
// `#if ARBQ_AVX512`, in its namespace, after binary_gemv_avx512.cpp whose helpers it uses).

// dst[0:16] = bf16(w), round to nearest even (AVX512-BF16 vcvtneps2bf16 where compiled, else bf16_bits).
inline void store_bf16x16(__m512 w, uint16_t* dst) {
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(w));
#else
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, w);
  for (int r = 0; r < 16; ++r) dst[r] = bf16_bits(tmp[r]);
#endif
}

// Rows r0:r1 of W for the batched path: every column from the planes with kind-0 values, then the salient
// columns overwritten from the aligned salient words with kind-1 values. binary_nm: the compact rows expanded
// first (dense_rows), kept columns only (pruned ones stored as 0). fp32 rows go to `out` [r1 - r0, K]; with
// out_bf16 (then `out` is unused) every 16 values are rounded to bf16 as they are stored (the same bits as an
// fp32 row rounded afterwards), the operand of the prefill path's bf16 (AMX/oneDNN) matmul. RC, GRP and NM are
// compile-time copies of a.rc, a.grp_on and a.nm, so the 16-column loop has no branches but its tail.
template <bool RC, bool GRP, bool NM>
void dequant_rows(const Layer& a, int64_t r0, int64_t r1, float* out, uint16_t* out_bf16) {
  const int64_t K = a.K, kp = (K + 15) / 16 * 16, sw = 16 * a.W, nch = kp / 16, nfull = K / 16;
  std::vector<float> cs(RC ? 2 * kp + 4 * sw : 0, 0.f);    // padded cs(0,0), cs(1,0); salient cs (g, o)
  std::vector<int32_t> scol(sw, -1);
  for (int64_t p = 0; p < a.S; ++p) scol[a.spos[p]] = a.sidx[p];
  if (RC) {
    for (int64_t j = 0; j < K; ++j) { cs[j] = a.cs[j]; cs[kp + j] = a.cs[2 * K + j]; }
    for (int64_t q = 0; q < sw; ++q)
      for (int go = 0; go < 4 && scol[q] >= 0; ++go) cs[2 * kp + go * sw + q] = a.cs[go * K + scol[q]];
  }
  const float* cs0 = cs.data();
  const float* cs1 = cs0 + kp;
  const float* css = cs0 + 2 * kp;  // [4, sw], index 2g + o
  alignas(64) int32_t ln[NSLOT];
  for (int s = 0; s < NSLOT; ++s) ln[s] = a.pos[s];
  at::parallel_for(r0, r1, 1, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> buf(NM ? 2 * a.Kb : 0);
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t i = b; i < e; ++i) {
      float* o = out_bf16 ? nullptr : out + (i - r0) * K;
      uint16_t* o16 = out_bf16 ? out_bf16 + (i - r0) * K : nullptr;
      auto put16 = [&](int64_t c, __m512 w) {                     // columns 16c .. 16c + 15
        if (o16) store_bf16x16(w, o16 + 16 * c);
        else _mm512_storeu_ps(o + 16 * c, w);
      };
      const uint8_t *s1, *gr, *kp8 = NM ? a.keep + i * a.Kb : nullptr;
      dense_rows(a, i, buf.data(), &s1, &gr);
      for (int64_t t = 0; t < a.T; ++t) {
        const __m512 v = _mm512_mul_ps(load_vals_vec(a, i, t), _mm512_set1_ps(a.vscale));
        auto lane = [&](int s) { return _mm512_permutexvar_ps(_mm512_set1_epi32(ln[s]), v); };
        const __m512 a00 = lane(A00), a01 = GRP ? lane(A01) : a00;
        const __m512 m00 = RC ? zero : lane(M00), m01 = RC || !GRP ? m00 : lane(M01);
        const int64_t c0 = t * (a.B / 16), c1 = std::min((t + 1) * (a.B / 16), nch);
        auto level = [&](int64_t c, __mmask16 ms, __mmask16 mg) {   // 16 columns of kind 0
          __m512 w = GRP ? _mm512_mask_blend_ps(mg, a00, a01) : a00;
          if (RC) w = _mm512_mul_ps(w, GRP ? _mm512_mask_blend_ps(mg, _mm512_loadu_ps(cs0 + 16 * c), _mm512_loadu_ps(cs1 + 16 * c))
                                           : _mm512_loadu_ps(cs0 + 16 * c));
          w = _mm512_mask_sub_ps(w, _knot_mask16(ms), zero, w);
          if (!RC) w = _mm512_add_ps(w, GRP ? _mm512_mask_blend_ps(mg, m00, m01) : m00);
          return w;
        };
        const int64_t cf = std::min(c1, nfull);
        for (int64_t c = c0; c < cf; ++c) {
          __m512 w = level(c, word16(s1 + 2 * c), GRP ? word16(gr + 2 * c) : 0);
          if (NM) w = _mm512_maskz_mov_ps(word16(kp8 + 2 * c), w);
          put16(c, w);
        }
        if (cf < c1) {   // the last 16 columns of a row whose K is not a multiple of 16 (one byte of bits)
          const int64_t c = cf;
          auto tail = [&](const uint8_t* plane) {   // the row's last one or two bytes of bits
            return _cvtu32_mask16(plane[2 * c] | (2 * c + 1 < a.Kb ? plane[2 * c + 1] << 8 : 0));
          };
          __m512 w = level(c, tail(s1), GRP ? tail(gr) : 0);
          if (NM) w = _mm512_maskz_mov_ps(tail(kp8), w);
          if (o16) {
            alignas(64) uint16_t w16[16];
            store_bf16x16(w, w16);
            std::copy(w16, w16 + (K - 16 * c), o16 + 16 * c);
          } else {
            _mm512_mask_storeu_ps(o + 16 * c, first_lanes(K - 16 * c), w);
          }
        }
        if (!a.sal) continue;
        const __m512 a101 = lane(A10_1), a111 = lane(A11_1), a102 = lane(A10_2), a112 = lane(A11_2);
        const __m512 m10 = lane(M10), m11 = lane(M11);
        for (int64_t w = a.woff[t]; w < a.woff[t + 1]; ++w) {
          const __mmask16 m1 = word16(a.s1w + i * 2 * a.W + 2 * w), m2 = word16(a.s2w + i * 2 * a.W + 2 * w);
          const __mmask16 mg = a.cgb ? word16(a.gw + i * 2 * a.W + 2 * w) : 0;
          __m512 w1 = _mm512_mask_blend_ps(mg, a101, a111), w2 = _mm512_mask_blend_ps(mg, a102, a112);
          if (RC) {
            w1 = _mm512_mul_ps(w1, _mm512_mask_blend_ps(mg, _mm512_loadu_ps(css + 16 * w), _mm512_loadu_ps(css + 2 * sw + 16 * w)));
            w2 = _mm512_mul_ps(w2, _mm512_mask_blend_ps(mg, _mm512_loadu_ps(css + sw + 16 * w), _mm512_loadu_ps(css + 3 * sw + 16 * w)));
          }
          __m512 val = _mm512_add_ps(_mm512_mask_sub_ps(w1, _knot_mask16(m1), zero, w1),
                                     _mm512_mask_sub_ps(w2, _knot_mask16(m2), zero, w2));
          if (!RC) val = _mm512_add_ps(val, _mm512_mask_blend_ps(mg, m10, m11));
          // the 16 values to their columns by plain stores (a vscatterdps costs several times more on Zen 4)
          if (NM) val = _mm512_maskz_mov_ps(word16(a.kw + i * 2 * a.W + 2 * w), val);
          const int32_t* col = scol.data() + 16 * w;
          if (o16) {
            alignas(64) uint16_t vv[16];
            store_bf16x16(val, vv);
#pragma GCC unroll 16
            for (int l = 0; l < 16; ++l)
              if (col[l] >= 0) o16[col[l]] = vv[l];
          } else {
            alignas(64) float vv[16];
            _mm512_store_ps(vv, val);
#pragma GCC unroll 16
            for (int l = 0; l < 16; ++l)
              if (col[l] >= 0) o[col[l]] = vv[l];
          }
        }
      }
    }
  });
}

void dequant_avx512(const Layer& a, int64_t r0, int64_t r1, float* out, uint16_t* out_bf16 = nullptr) {
  const int key = (a.rc ? 4 : 0) | (a.grp_on ? 2 : 0) | (a.nm ? 1 : 0);
  switch (key) {
    case 0: return dequant_rows<false, false, false>(a, r0, r1, out, out_bf16);
    case 1: return dequant_rows<false, false, true>(a, r0, r1, out, out_bf16);
    case 2: return dequant_rows<false, true, false>(a, r0, r1, out, out_bf16);
    case 3: return dequant_rows<false, true, true>(a, r0, r1, out, out_bf16);
    case 4: return dequant_rows<true, false, false>(a, r0, r1, out, out_bf16);
    case 5: return dequant_rows<true, false, true>(a, r0, r1, out, out_bf16);
    case 6: return dequant_rows<true, true, false>(a, r0, r1, out, out_bf16);
    default: return dequant_rows<true, true, true>(a, r0, r1, out, out_bf16);
  }
}
