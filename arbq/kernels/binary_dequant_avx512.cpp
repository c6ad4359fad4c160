// AVX-512 dequantization for the batched path (#included by binary_gemv.cpp inside
// `#if ARBQ_AVX512`, in its namespace, after binary_gemv_avx512.cpp whose helpers it uses).

// Rows r0:r1 of W (fp32) for the batched path: every column from the planes with kind-0 values, then
// the salient columns overwritten (scatter) from the aligned salient words with kind-1 values. binary_nm:
// the compact rows expanded first (dense_rows), kept columns only (pruned ones stored as 0).
void dequant_avx512(const Layer& a, int64_t r0, int64_t r1, float* out) {
  const int64_t K = a.K, kp = (K + 15) / 16 * 16, sw = 16 * a.W, nch = kp / 16, nfull = a.Kb / 2;
  std::vector<float> cs(a.rc ? 6 * kp + 4 * sw : 0, 0.f);    // padded cs(0,0), cs(1,0); salient cs (g, o)
  std::vector<int32_t> scol(sw, -1);
  for (int64_t p = 0; p < a.S; ++p) scol[a.spos[p]] = a.sidx[p];
  if (a.rc) {
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
    std::vector<uint8_t> buf(a.nm ? 2 * a.Kb : 0);
    for (int64_t i = b; i < e; ++i) {
      float* o = out + (i - r0) * K;
      const uint8_t *s1, *gr, *kp8 = a.nm ? a.keep + i * a.Kb : nullptr;
      dense_rows(a, i, buf.data(), &s1, &gr);
      for (int64_t t = 0; t < a.T; ++t) {
        const __m512 v = _mm512_mul_ps(load_vals_vec(a, i, t), _mm512_set1_ps(a.vscale));
        auto lane = [&](int s) { return _mm512_permutexvar_ps(_mm512_set1_epi32(ln[s]), v); };
        const __m512 a00 = lane(A00), a01 = lane(A01), m00 = lane(M00), m01 = lane(M01);
        const int64_t c1 = std::min((t + 1) * (a.B / 16), nch);
        for (int64_t c = t * (a.B / 16); c < c1; ++c) {
          const bool tail = c >= nfull;
          const __mmask16 ms = tail ? _cvtu32_mask16(s1[2 * c]) : word16(s1 + 2 * c);
          const __mmask16 mg = !a.grp_on ? 0 : tail ? _cvtu32_mask16(gr[2 * c]) : word16(gr + 2 * c);
          __m512 w = _mm512_mask_blend_ps(mg, a00, a01);
          if (a.rc) w = _mm512_mul_ps(w, _mm512_mask_blend_ps(mg, _mm512_loadu_ps(cs0 + 16 * c), _mm512_loadu_ps(cs1 + 16 * c)));
          w = _mm512_mask_sub_ps(w, _knot_mask16(ms), _mm512_setzero_ps(), w);
          if (!a.rc) w = _mm512_add_ps(w, _mm512_mask_blend_ps(mg, m00, m01));
          if (a.nm) w = _mm512_maskz_mov_ps(tail ? _cvtu32_mask16(kp8[2 * c]) : word16(kp8 + 2 * c), w);
          const int64_t left = K - 16 * c;
          _mm512_mask_storeu_ps(o + 16 * c, _cvtu32_mask16(left >= 16 ? 0xFFFFu : (1u << left) - 1u), w);
        }
        if (!a.sal) continue;
        const __m512 a101 = lane(A10_1), a111 = lane(A11_1), a102 = lane(A10_2), a112 = lane(A11_2);
        const __m512 m10 = lane(M10), m11 = lane(M11);
        for (int64_t w = a.woff[t]; w < a.woff[t + 1]; ++w) {
          const __mmask16 m1 = word16(a.s1w + i * 2 * a.W + 2 * w), m2 = word16(a.s2w + i * 2 * a.W + 2 * w);
          const __mmask16 mg = a.cgb ? word16(a.gw + i * 2 * a.W + 2 * w) : 0;
          __m512 w1 = _mm512_mask_blend_ps(mg, a101, a111), w2 = _mm512_mask_blend_ps(mg, a102, a112);
          if (a.rc) {
            w1 = _mm512_mul_ps(w1, _mm512_mask_blend_ps(mg, _mm512_loadu_ps(css + 16 * w), _mm512_loadu_ps(css + 2 * sw + 16 * w)));
            w2 = _mm512_mul_ps(w2, _mm512_mask_blend_ps(mg, _mm512_loadu_ps(css + sw + 16 * w), _mm512_loadu_ps(css + 3 * sw + 16 * w)));
          }
          __m512 val = _mm512_add_ps(_mm512_mask_sub_ps(w1, _knot_mask16(m1), _mm512_setzero_ps(), w1),
                                     _mm512_mask_sub_ps(w2, _knot_mask16(m2), _mm512_setzero_ps(), w2));
          if (!a.rc) val = _mm512_add_ps(val, _mm512_mask_blend_ps(mg, m10, m11));
          const __m512i idx = _mm512_loadu_si512(scol.data() + 16 * w);
          __mmask16 put = _mm512_cmpge_epi32_mask(idx, _mm512_setzero_si512());
          if (a.nm) put = _kand_mask16(put, word16(a.kw + i * 2 * a.W + 2 * w));
          _mm512_mask_i32scatter_ps(o, put, idx, val, 4);
        }
      }
    }
  });
}
