// Table-lookup GEMV for grouped schemes (billm, arb, x, rc, with or without CGB), #included by
// binary_gemv.cpp inside `#if ARBQ_AVX512`, in its namespace, after binary_dequant_avx512.cpp (whose
// store_bf16x16 the batched dequantization below uses). Rows are the vector lanes: 16 rows per
// "row group", R row groups per tile share every table load, so no horizontal reduction is ever needed.
//
// Non-salient pass (every column, as if all were non-salient), per block t and row i:
//   U = sum_{g=0} s1 z00,  V = sum_{g=1} s1 z10,  X1 = sum_{g=1} x        (s1 = +-1, z_go = c[g,o,:] x)
//   y += a00 U + a01 V [+ m00 (TX_t - X1) + m01 X1]
// Two columns have 4 bits (s1, g each), so each of U, V, X1 is a 16-entry table per column pair, built
// once per call: table[c] = the pair's contribution under code c. One byte of the kernel layout holds
// two pairs' codes for one row, 16 rows are 16 consecutive bytes, and vpermps looks 16 rows up at once
// (it reads only the low 4 bits of each index lane; the second pair's code is the byte shifted by 4).
//
// Salient correction, per salient column j of block t (the same columns for every row), 16 rows at once
// from 16-bit row masks (n1: s1 = -1, n2: s2 = -1, g: group 1; n1 and g tested in the 16 code bytes of
// column j's quad, n2 the complement of the stored sign2 word), with g chosen per row:
//   y += (a1g_1 - a0g) s1 z_g0 + a1g_2 s2 z_g1 [+ (m1g - m0g) x]
// accumulated as sums over all salient columns of the block and over those with g = 1.
//
// N:M (binary_nm, RC schemes): the codes are the expanded planes, so a pruned weight reads s = -1, g = 0 and
// the non-salient pass adds -z_0 for it; a third table per quad, indexed by the quad's pruned bits (the
// complement of its keep nibble), adds those z_0 back into U: P[u] = sum_{i in u} z_0 (same step as U), so
// pruned weights contribute exactly 0 before rounding. The salient sums are masked by the keep bits.
//
// int16 tables (ARBQ_LUT16, block size a multiple of 8, the default): z_0, z_1 and x are rounded per block t to
// integers q = rint(z / s_t), s_t = max_{j in t} |z_j| / 16383, so every pair entry fits int16 and a block's
// sums are exact in int32; U = s_t (sum of q), etc. Two quads of one row group are read at once: vpermb puts
// row r's byte of quad 2o in word 2r and of quad 2o+1 in word 2r+1, vpermw looks 32 words up in a 32-entry
// table (pairs 4o | 4o+2 for the low nibbles, 4o+1 | 4o+3 for the high ones; the index's bit 4 = the word's
// parity) and vpdpwssd adds words 2r and 2r+1 into row r's int32 lane. Per output the error is at most
// 1/2 s_t |a| per column of the non-salient pass (about 1e-5 of |y| for Gaussian x); the salient correction
// stays fp32.

struct Lut {
  int64_t N16, KQ, T, B, V, S;
  const uint8_t* codes;      // [N16, KQ, 16]: low nibble pair 2q, high nibble pair 2q+1 (code: s_a | g_a<<1 | s_b<<2 | g_b<<3)
  const uint16_t* s2w;       // [N16, S]: second sign of 16 rows per salient column (bit r: row 16G + r, 1 = +1)
  const int32_t *sidx, *soff;  // [S] salient columns (sorted); [T+1] first salient of each block
  const void* vt;            // [N16, T, V, 16] values, rows last (fp16 or fp32, vscale applied)
  bool vhalf;
  int pos[NSLOT];
  const float* cs;           // [4, K] column scales (RC)
  bool rc, cgb;
  const uint8_t* keep;       // N:M: [N16, KB, 16] keep bytes (columns 8b..8b+7 of row 16G + r), else null
  int64_t KB;
};

// Bit of column j's sign in its code byte (the group bit is the next one): column pair (j & 3) >> 1 is the
// byte's low or high nibble, j & 1 the pair's first or second column.
inline int code_shift(int64_t j) { return 4 * static_cast<int>((j & 3) >> 1) + 2 * static_cast<int>(j & 1); }

inline __m512 lut_val(const Lut& L, int64_t rg, int64_t t, int s) {
  if (L.pos[s] == kZeroLane) return _mm512_setzero_ps();
  const int64_t off = ((rg * L.T + t) * L.V + L.pos[s]) * 16;
  if (L.vhalf)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(L.vt) + off)));
  return _mm512_loadu_ps(static_cast<const float*>(L.vt) + off);
}

struct LutCall {
  const float *tu, *tv, *tx;   // [KQ*2, 16] tables
  const float* tx_blk;         // [T] sum of x over the block (non-RC means)
  const float* zs;             // [S, 5]: z00, z01, z10, z11, x at each salient column
  const float* txs_blk;        // [T] sum of x over the block's salient columns
  const int16_t *qu, *qv, *qx;  // int16 tables [KO, 2, 32] (KO = ceil(KQ / 2)), or null: fp32 tables
  const float *su, *sv, *sx;    // [T] their per-block steps s_t
  const float* tp;              // N:M, fp32: [KQ, 16] pruned-sum tables of each quad
  const int16_t* qp;            // N:M, int16: [KB, 32] the two quads' tables of each keep byte
};

#if ARBQ_LUT16
// Sums of block t from int16 tables into U, V, X (fp32, the step applied): the module comment's int16 pass.
template <int R, bool RC, bool NM>
inline void block_sums16(const Lut& L, const LutCall& c, const uint8_t* const* cp, const uint8_t* const* kp, int64_t t,
                         __m512* U, __m512* V, __m512* X) {
  const int64_t opb = L.B / 8, KO = (L.KQ + 1) / 2, o1 = std::min((t + 1) * opb, KO);
  alignas(64) static const struct Spread { uint8_t b[64]; Spread() { for (int i = 0; i < 64; ++i) b[i] = (i & 1) ? 0 : (i & 2 ? 16 : 0) + i / 4; } } spread;
  // keep bytes: row r's byte in words 2r and 2r+1, the odd word shifted to its high nibble
  alignas(64) static const struct Dup { uint8_t b[64]; Dup() { for (int i = 0; i < 64; ++i) b[i] = (i & 1) ? 0 : i / 4; } } dup;
  const __m512i sidx = _mm512_load_si512(spread.b), m0f = _mm512_set1_epi16(0x0F), odd = _mm512_set1_epi32(0x00100000),
                ones = _mm512_set1_epi16(1), didx = _mm512_load_si512(dup.b), nib = _mm512_set1_epi32(0x00040000);
  __m512i Ui[R], Vi[R], Xi[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) Ui[r] = Vi[r] = Xi[r] = _mm512_setzero_si512();
  for (int64_t o = t * opb; o < o1; ++o) {
    const __m512i u0 = _mm512_load_si512(c.qu + 64 * o), u1 = _mm512_load_si512(c.qu + 64 * o + 32);
    const __m512i v0 = _mm512_load_si512(c.qv + 64 * o), v1 = _mm512_load_si512(c.qv + 64 * o + 32);
    __m512i x0, x1;
    if (!RC) { x0 = _mm512_load_si512(c.qx + 64 * o); x1 = _mm512_load_si512(c.qx + 64 * o + 32); }
    const bool whole = 2 * o + 1 < L.KQ;         // the last octet of an odd KQ has one quad
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* b = cp[r] + 32 * o;
      const __m256i raw = whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b))
                                : _mm256_maskz_loadu_epi8(0xFFFFu, b);
      const __m512i w = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, sidx, _mm512_castsi256_si512(raw));
      const __m512i i0 = _mm512_ternarylogic_epi32(w, m0f, odd, 0xEA);             // (w & 0xF) | parity << 4
      const __m512i i1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), m0f, odd, 0xEA);
      Ui[r] = _mm512_dpwssd_epi32(Ui[r], _mm512_permutexvar_epi16(i0, u0), ones);
      Vi[r] = _mm512_dpwssd_epi32(Vi[r], _mm512_permutexvar_epi16(i0, v0), ones);
      Ui[r] = _mm512_dpwssd_epi32(Ui[r], _mm512_permutexvar_epi16(i1, u1), ones);
      Vi[r] = _mm512_dpwssd_epi32(Vi[r], _mm512_permutexvar_epi16(i1, v1), ones);
      if (NM) {      // pruned weights back: (~keep nibble) | parity << 4 indexes [P(quad 2o) | P(quad 2o+1)]
        const __m512i kb = _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, didx,
                                                         _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kp[r] + 16 * o))));
        const __m512i ip = _mm512_ternarylogic_epi32(_mm512_srlv_epi16(kb, nib), m0f, odd, 0xAE);   // (~a & b) | c
        Ui[r] = _mm512_dpwssd_epi32(Ui[r], _mm512_permutexvar_epi16(ip, _mm512_load_si512(c.qp + 32 * o)), ones);
      }
      if (!RC) {
        Xi[r] = _mm512_dpwssd_epi32(Xi[r], _mm512_permutexvar_epi16(i0, x0), ones);
        Xi[r] = _mm512_dpwssd_epi32(Xi[r], _mm512_permutexvar_epi16(i1, x1), ones);
      }
    }
  }
  const __m512 su = _mm512_set1_ps(c.su[t]), sv = _mm512_set1_ps(c.sv[t]), sx = RC ? su : _mm512_set1_ps(c.sx[t]);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    U[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(Ui[r]), su);
    V[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(Vi[r]), sv);
    if (!RC) X[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(Xi[r]), sx);
  }
}
#endif

// Sums of block t from fp32 tables into U, V, X: the module comment's non-salient pass.
template <int R, bool RC, bool NM>
inline void block_sums32(const Lut& L, const LutCall& c, const uint8_t* const* cp, const uint8_t* const* kp, int64_t t,
                         __m512* U, __m512* V, __m512* X) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) U[r] = V[r] = X[r] = _mm512_setzero_ps();
  const int64_t qpb = L.B / 4, q1 = std::min((t + 1) * qpb, L.KQ);
  for (int64_t q = t * qpb; q < q1; ++q) {
    const float* tq = c.tu + 32 * q;
    const __m512 u0 = _mm512_load_ps(tq), u1 = _mm512_load_ps(tq + 16);
    const __m512 v0 = _mm512_load_ps(c.tv + 32 * q), v1 = _mm512_load_ps(c.tv + 32 * q + 16);
    __m512 x0, x1;
    if (!RC) { x0 = _mm512_load_ps(c.tx + 32 * q); x1 = _mm512_load_ps(c.tx + 32 * q + 16); }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cp[r] + 16 * q)));
      const __m512i i1 = _mm512_srli_epi32(i0, 4);
      U[r] = _mm512_add_ps(U[r], _mm512_permutexvar_ps(i0, u0));
      V[r] = _mm512_add_ps(V[r], _mm512_permutexvar_ps(i0, v0));
      U[r] = _mm512_add_ps(U[r], _mm512_permutexvar_ps(i1, u1));
      V[r] = _mm512_add_ps(V[r], _mm512_permutexvar_ps(i1, v1));
      if (NM) {      // pruned weights back: ~keep nibble of quad q indexes its pruned-sum table
        const __m512i kb = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kp[r] + 16 * (q >> 1))));
        const __m512i ip = _mm512_srl_epi32(_mm512_xor_si512(kb, _mm512_set1_epi32(-1)), _mm_cvtsi32_si128(4 * static_cast<int>(q & 1)));
        U[r] = _mm512_add_ps(U[r], _mm512_permutexvar_ps(ip, _mm512_load_ps(c.tp + 16 * q)));
      }
      if (!RC) {
        X[r] = _mm512_add_ps(X[r], _mm512_permutexvar_ps(i0, x0));
        X[r] = _mm512_add_ps(X[r], _mm512_permutexvar_ps(i1, x1));
      }
    }
  }
}

template <int R, bool RC, bool CGB, bool I16, bool NM>
void lut_tile(const Lut& L, const LutCall& c, int64_t rg0, int64_t N, float* y_out) {
  __m512 y[R];
  const uint8_t* cp[R];
  const uint8_t* kp[R];
  const uint16_t* mp[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    y[r] = _mm512_setzero_ps();
    cp[r] = L.codes + (rg0 + r) * L.KQ * 16;
    kp[r] = NM ? L.keep + (rg0 + r) * L.KB * 16 : nullptr;
    mp[r] = L.s2w + (rg0 + r) * L.S;
  }
  const __m512 sgn = _mm512_set1_ps(-0.f);
  for (int64_t t = 0; t < L.T; ++t) {
    __m512 U[R], V[R], X[R];
#if ARBQ_LUT16
    if (I16) block_sums16<R, RC, NM>(L, c, cp, kp, t, U, V, X);
    else
#endif
      block_sums32<R, RC, NM>(L, c, cp, kp, t, U, V, X);
    // salient columns of the block: sums over all of them (A) and over those in group 1 (G)
    __m512 Q1a[R], Q1g[R], Q2a[R], Q2g[R], XSg[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) Q1a[r] = Q1g[r] = Q2a[r] = Q2g[r] = XSg[r] = _mm512_setzero_ps();
    for (int64_t p = L.soff[t]; p < L.soff[t + 1]; ++p) {
      const float* z = c.zs + 5 * p;
      const int64_t j = L.sidx[p], qoff = 16 * (j >> 2);
      const int shift = code_shift(j);
      const __m128i sbit = _mm_set1_epi8(static_cast<char>(1 << shift)), gbit = _mm_set1_epi8(static_cast<char>(2 << shift));
      const __m512 z00 = _mm512_set1_ps(z[0]), z01 = _mm512_set1_ps(z[1]);
      const __m512 z10 = RC && CGB ? _mm512_set1_ps(z[2]) : z00, z11 = RC && CGB ? _mm512_set1_ps(z[3]) : z01;
      const __m512 xb = _mm512_set1_ps(z[4]);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m128i cb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cp[r] + qoff));
        const __mmask16 n1 = _mm_testn_epi8_mask(cb, sbit), n2 = _cvtu32_mask16(~static_cast<uint32_t>(mp[r][p]) & 0xFFFFu);
        const __mmask16 g = CGB ? _mm_test_epi8_mask(cb, gbit) : 0;
        const __m512 w1 = RC && CGB ? _mm512_mask_blend_ps(g, z00, z10) : z00;
        const __m512 w2 = RC && CGB ? _mm512_mask_blend_ps(g, z01, z11) : z01;
        const __m512 u1 = _mm512_mask_xor_ps(w1, n1, w1, sgn), u2 = _mm512_mask_xor_ps(w2, n2, w2, sgn);
        if (NM) {     // pruned rows add nothing (their group bit is 0, so the G sums skip them already)
          const __mmask16 kept = _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kp[r] + 16 * (j >> 3))),
                                                    _mm_set1_epi8(static_cast<char>(1 << (j & 7))));
          Q1a[r] = _mm512_mask_add_ps(Q1a[r], kept, Q1a[r], u1);
          Q2a[r] = _mm512_mask_add_ps(Q2a[r], kept, Q2a[r], u2);
        } else {
          Q1a[r] = _mm512_add_ps(Q1a[r], u1);
          Q2a[r] = _mm512_add_ps(Q2a[r], u2);
        }
        if (CGB) {
          Q1g[r] = _mm512_mask_add_ps(Q1g[r], g, Q1g[r], u1);
          Q2g[r] = _mm512_mask_add_ps(Q2g[r], g, Q2g[r], u2);
          if (!RC) XSg[r] = _mm512_mask_add_ps(XSg[r], g, XSg[r], xb);
        }
      }
    }
    const bool sal = L.soff[t + 1] > L.soff[t];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int64_t rg = rg0 + r;
      const __m512 a00 = lut_val(L, rg, t, A00), a01 = lut_val(L, rg, t, A01);
      y[r] = _mm512_fmadd_ps(a00, U[r], y[r]);
      y[r] = _mm512_fmadd_ps(a01, V[r], y[r]);
      __m512 m00, m01;
      if (!RC) {
        m00 = lut_val(L, rg, t, M00); m01 = lut_val(L, rg, t, M01);
        y[r] = _mm512_fmadd_ps(m00, _mm512_sub_ps(_mm512_set1_ps(c.tx_blk[t]), X[r]), y[r]);
        y[r] = _mm512_fmadd_ps(m01, X[r], y[r]);
      }
      if (!sal) continue;
      // group 0 part = all - group 1 part
      y[r] = _mm512_fmadd_ps(_mm512_sub_ps(lut_val(L, rg, t, A10_1), a00), _mm512_sub_ps(Q1a[r], Q1g[r]), y[r]);
      y[r] = _mm512_fmadd_ps(lut_val(L, rg, t, A10_2), _mm512_sub_ps(Q2a[r], Q2g[r]), y[r]);
      if (CGB) {
        y[r] = _mm512_fmadd_ps(_mm512_sub_ps(lut_val(L, rg, t, A11_1), a01), Q1g[r], y[r]);
        y[r] = _mm512_fmadd_ps(lut_val(L, rg, t, A11_2), Q2g[r], y[r]);
      }
      if (!RC) {
        const __m512 xs = _mm512_set1_ps(c.txs_blk[t]);
        y[r] = _mm512_fmadd_ps(_mm512_sub_ps(lut_val(L, rg, t, M10), m00), _mm512_sub_ps(xs, XSg[r]), y[r]);
        if (CGB) y[r] = _mm512_fmadd_ps(_mm512_sub_ps(lut_val(L, rg, t, M11), m01), XSg[r], y[r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const int64_t i0 = (rg0 + r) * 16, n = std::min<int64_t>(16, N - i0);
    if (n > 0) _mm512_mask_storeu_ps(y_out + i0, first_lanes(n), y[r]);
  }
}

template <bool RC, bool CGB, bool I16, bool NM = false>
void lut_rows(const Lut& L, const LutCall& c, int64_t N, float* y) {
  // R row groups per tile share each table load (8 spills the salient sums: 10-15% slower, measured)
  constexpr int R = 4;
  const int64_t tiles = L.N16 / R;
  // at least ~128K weights per thread: a fork / join costs microseconds and the second core first pulls the
  // call's tables from the first one's cache. Session 14 (decode-like back-to-back calls, tables built in int16
  // lanes): two threads from 576 × 576 on, 12.8 vs 13.6-14.0 µs at 576 × 576 (rc+cgb), 26.2 vs 32.7 µs at
  // 576 × 1536; before, one thread below 1024 rows (measured then: 576 × 576 19 vs 25 µs, calls timed alone)
  const int64_t grain = std::max<int64_t>(1, (131072 + 16 * R * 4 * L.KQ - 1) / (16 * R * 4 * L.KQ));
  at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) lut_tile<R, RC, CGB, I16, NM>(L, c, g * R, N, y);
  });
  for (int64_t rg = tiles * R; rg < L.N16; ++rg) lut_tile<1, RC, CGB, I16, NM>(L, c, rg, N, y);
}

// lut_rows for the layer's scheme: N:M (RC only), RC or not, with or without CGB.
template <bool I16>
void rows_of_scheme(const Lut& L, const LutCall& c, int64_t N, float* y) {
  if (L.keep) L.cgb ? lut_rows<true, true, I16, true>(L, c, N, y) : lut_rows<true, false, I16, true>(L, c, N, y);
  else if (L.rc) L.cgb ? lut_rows<true, true, I16>(L, c, N, y) : lut_rows<true, false, I16>(L, c, N, y);
  else L.cgb ? lut_rows<false, true, I16>(L, c, N, y) : lut_rows<false, false, I16>(L, c, N, y);
}

// v [len] rounded per block t of B columns: q_j = rint(v_j / s_t), s_t = max_{j in t} |v_j| / qmax (0 for an
// all-zero block) into step [ceil(len / B)], the q_j as int16 into qi and / or as fp32 into qf (each where not
// null). qmax = 16383, or 8191 where 4-column sums must fit int16 too.
void quantize_blocks(const float* v, int64_t len, int64_t B, float qmax, float* step, int16_t* qi, float* qf) {
  for (int64_t t = 0, j0 = 0; j0 < len; ++t, j0 += B) {
    const int64_t j1 = std::min(len, j0 + B);
    __m512 m = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(first_lanes(j1 - j), v + j)));
    const float mx = _mm512_reduce_max_ps(m), inv = mx > 0.f ? qmax / mx : 0.f;
    step[t] = mx / qmax;
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t j = j0; j < j1; j += 16) {
      const __mmask16 k = first_lanes(j1 - j);
      const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + j), vinv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      if (qi) _mm512_mask_cvtepi32_storeu_epi16(qi + j, k, _mm512_cvtps_epi32(r));
      if (qf) _mm512_mask_storeu_ps(qf + j, k, r);
    }
  }
}

#if ARBQ_LUT16
// The int16 pair tables of n code patterns from one rounded input qi [8 KO], in block_sums16's octet order:
// out[i] [KO, 2, 32] = (pairs 4o | 4o+2, pairs 4o+1 | 4o+3), entry c of pair p = q_{2p} pa[i][c] + q_{2p+1} pb[i][c]
// (pa, pb: int16 [32], the 16 codes' factors in {-1, 0, 1} twice); exact, |entry| <= 2 qmax. The octet's 8 q sit
// in one 128-bit load; vpermw spreads column a (b) of the two pairs of a half over its 16-word halves.
void pair_tables16(int64_t KO, const int16_t* qi, const __m512i* pa, const __m512i* pb, int n, int16_t* const* out) {
  alignas(64) int16_t ia[2][32], ib[2][32];
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      ia[h][l] = static_cast<int16_t>(2 * h + (l >= 16 ? 4 : 0));
      ib[h][l] = static_cast<int16_t>(ia[h][l] + 1);
    }
  const __m512i ia0 = _mm512_load_si512(ia[0]), ia1 = _mm512_load_si512(ia[1]), ib0 = _mm512_load_si512(ib[0]),
                ib1 = _mm512_load_si512(ib[1]);
  for (int64_t o = 0; o < KO; ++o) {
    const __m512i q8 = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qi + 8 * o)));
    const __m512i a0 = _mm512_permutexvar_epi16(ia0, q8), b0 = _mm512_permutexvar_epi16(ib0, q8),
                  a1 = _mm512_permutexvar_epi16(ia1, q8), b1 = _mm512_permutexvar_epi16(ib1, q8);
    for (int i = 0; i < n; ++i) {
      _mm512_store_si512(out[i] + 64 * o, _mm512_add_epi16(_mm512_mullo_epi16(a0, pa[i]), _mm512_mullo_epi16(b0, pb[i])));
      _mm512_store_si512(out[i] + 64 * o + 32, _mm512_add_epi16(_mm512_mullo_epi16(a1, pa[i]), _mm512_mullo_epi16(b1, pb[i])));
    }
  }
}
#endif

// Pruned-sum tables of N:M (module comment): entry u of a run of 4 columns = sum of v over the set bits of u,
// 16 per run; runs = n4 consecutive runs of v, out [n4, 16] (fp32 or, rounded exactly, int16).
template <class T>
void subset_tables(const float* v, int64_t n4, T* out) {
  alignas(64) float b[4][16];
  for (int u = 0; u < 16; ++u)
    for (int i = 0; i < 4; ++i) b[i][u] = static_cast<float>((u >> i) & 1);
  const __m512 b0 = _mm512_load_ps(b[0]), b1 = _mm512_load_ps(b[1]), b2 = _mm512_load_ps(b[2]), b3 = _mm512_load_ps(b[3]);
  for (int64_t r = 0; r < n4; ++r) {
    const float* w = v + 4 * r;
    const __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(w[0]), b0, _mm512_fmadd_ps(_mm512_set1_ps(w[1]), b1,
                     _mm512_fmadd_ps(_mm512_set1_ps(w[2]), b2, _mm512_mul_ps(_mm512_set1_ps(w[3]), b3))));
    if constexpr (std::is_same_v<T, float>) _mm512_store_ps(out + 16 * r, e);
    else _mm256_store_si256(reinterpret_cast<__m256i*>(out + 16 * r), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(e)));
  }
}

// Sum of v over each block t of [0, K): out [T] (16 lanes, then the lanes' sum).
inline void block_sums(const float* v, int64_t K, int64_t B, int64_t T, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t j1 = std::min(K, (t + 1) * B);
    __m512 s = _mm512_setzero_ps();
    for (int64_t j = t * B; j < j1; j += 16)
      s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(first_lanes(j1 - j), v + j));
    out[t] = _mm512_reduce_add_ps(s);
  }
}

// y [N] = W x for one x row [K]: tables and salient inputs once per call, then the tiles. i16: int16 tables
// (needs ARBQ_LUT16 and B % 8 == 0), else fp32.
void gemv_lut(const Lut& L, const float* x, int64_t K, int64_t N, float* y, bool i16) {
  const int64_t np = 2 * L.KQ, kp = 4 * L.KQ, ko = (L.KQ + 1) / 2;
  // one scratch per calling thread, grown when needed (a fresh allocation of the tables costs page faults
  // that, at small N, take longer than the lookups): z0, z1, x [kp] each, then the tables, 64-byte aligned
  // fp32 [3][np, 16] + N:M's [KQ, 16] (int16 [3][KO, 2, 32] + [KO, 32] take half), then the int16 inputs
  // [8 KO] and fp32 [8 KO], the block sums of x and of its salient columns [T] each, the salient inputs [S, 5]
  // and the steps [3 T]
  const int64_t tab_floats = 3 * 16 * np + 16 * (L.KQ + 1);
  static thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(3 * kp + tab_floats + 16 + 4 * ko + 8 * ko + 5 * L.T + 5 * L.S + 16);
  if (scratch.size() < need) scratch.assign(need, 0.f);
  float *z0 = scratch.data(), *z1 = z0 + kp, *xp = z1 + kp;
  float* tab = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xp + kp) + 63) & ~uintptr_t(63));
  auto* qi = reinterpret_cast<int16_t*>(tab + tab_floats);
  float *qf = tab + tab_floats + 4 * ko, *txb = qf + 8 * ko, *txs = txb + L.T, *steps = txs + L.T, *zs = steps + 3 * L.T;
  std::memcpy(xp, x, sizeof(float) * K);
  if (L.rc) {
    const float *c0 = L.cs, *c1 = L.cs + 2 * K;
    for (int64_t j = 0; j < K; ++j) { z0[j] = c0[j] * x[j]; z1[j] = c1[j] * x[j]; }
  } else {
    std::memcpy(z0, x, sizeof(float) * K);
    std::memcpy(z1, x, sizeof(float) * K);
  }
  for (int64_t j = K; j < kp; ++j) z0[j] = z1[j] = xp[j] = 0.f;
  // code bit 0/2: sign of column a/b (1: +), bit 1/3: group of column a/b
  alignas(64) float pa0[16], pa1[16], pb0[16], pb1[16], ga[16], gb[16];
  for (int cde = 0; cde < 16; ++cde) {
    const float sa = (cde & 1) ? 1.f : -1.f, sb = (cde & 4) ? 1.f : -1.f;
    const bool gA = cde & 2, gB = cde & 8;
    pa0[cde] = gA ? 0.f : sa; pa1[cde] = gA ? sa : 0.f; ga[cde] = gA;
    pb0[cde] = gB ? 0.f : sb; pb1[cde] = gB ? sb : 0.f; gb[cde] = gB;
  }
  block_sums(x, K, L.B, L.T, txb);
  for (int64_t p = 0; p < L.S; ++p) {
    const int64_t j = L.sidx[p];
    float* o = zs + 5 * p;
    o[0] = z0[j]; o[2] = z1[j]; o[4] = x[j];
    o[1] = L.rc ? L.cs[K + j] * x[j] : x[j];
    o[3] = L.rc ? L.cs[3 * K + j] * x[j] : x[j];
  }
  for (int64_t t = 0; t < L.T; ++t) {
    txs[t] = 0.f;
    for (int64_t p = L.soff[t]; p < L.soff[t + 1]; ++p) txs[t] += x[L.sidx[p]];
  }
  LutCall c{nullptr, nullptr, nullptr, txb, zs, txs, nullptr, nullptr, nullptr, steps, steps + L.T, steps + 2 * L.T};
  const bool nm = L.keep != nullptr;     // N:M (RC schemes only: make_lut checks)
#if ARBQ_LUT16
  if (i16) {
    alignas(64) int16_t pat[6][32];        // pa0 pb0 pa1 pb1 ga gb as int16, twice each
    const float* src[6] = {pa0, pb0, pa1, pb1, ga, gb};
    for (int i = 0; i < 6; ++i)
      for (int l = 0; l < 32; ++l) pat[i][l] = static_cast<int16_t>(src[i][l & 15]);
    __m512i P[6];
    for (int i = 0; i < 6; ++i) P[i] = _mm512_load_si512(pat[i]);
    auto* t16 = reinterpret_cast<int16_t*>(tab);
    int16_t* const outs[3] = {t16, t16 + 64 * ko, t16 + 128 * ko};
    const float qmax = nm ? 8191.f : 16383.f;
    std::fill(qi + kp, qi + 8 * ko, int16_t{0});             // the inputs [4 KQ] (zero past K), padded to octets
    std::fill(qf + kp, qf + 8 * ko, 0.f);
    if (L.rc) {                                  // U from z0, V from z1
      const __m512i pa[1] = {P[2]}, pb[1] = {P[3]};
      quantize_blocks(z1, kp, L.B, qmax, steps + L.T, qi, nullptr);
      pair_tables16(ko, qi, pa, pb, 1, outs + 1);
      quantize_blocks(z0, kp, L.B, qmax, steps, qi, nm ? qf : nullptr);
      pair_tables16(ko, qi, P, P + 1, 1, outs);
    } else {                                     // z0 = z1 = x: one rounding, three tables
      const __m512i pa[3] = {P[0], P[2], P[4]}, pb[3] = {P[1], P[3], P[5]};
      quantize_blocks(xp, kp, L.B, qmax, steps, qi, nullptr);
      std::copy(steps, steps + L.T, steps + L.T);
      std::copy(steps, steps + L.T, steps + 2 * L.T);
      pair_tables16(ko, qi, pa, pb, 3, outs);
    }
    c.qu = t16; c.qv = t16 + 64 * ko; c.qx = t16 + 128 * ko;
    if (nm) {
      c.qp = t16 + 192 * ko;
      subset_tables(qf, 2 * ko, t16 + 192 * ko);
    }
    rows_of_scheme<true>(L, c, N, y);
    return;
  }
#endif
  const __m512 PA0 = _mm512_load_ps(pa0), PA1 = _mm512_load_ps(pa1), PB0 = _mm512_load_ps(pb0),
               PB1 = _mm512_load_ps(pb1), GA = _mm512_load_ps(ga), GB = _mm512_load_ps(gb);
  (void)i16;
  // fp32 tables: 16 codes per pair
  float *tu = tab, *tv = tab + 16 * np, *tx = tab + 32 * np;
  for (int64_t p = 0; p < np; ++p) {
    const int64_t ja = 2 * p, jb = ja + 1;
    _mm512_store_ps(tu + 16 * p, _mm512_fmadd_ps(_mm512_set1_ps(z0[ja]), PA0, _mm512_mul_ps(_mm512_set1_ps(z0[jb]), PB0)));
    _mm512_store_ps(tv + 16 * p, _mm512_fmadd_ps(_mm512_set1_ps(z1[ja]), PA1, _mm512_mul_ps(_mm512_set1_ps(z1[jb]), PB1)));
    if (!L.rc)
      _mm512_store_ps(tx + 16 * p, _mm512_fmadd_ps(_mm512_set1_ps(xp[ja]), GA, _mm512_mul_ps(_mm512_set1_ps(xp[jb]), GB)));
  }
  c.tu = tu; c.tv = tv; c.tx = tx;
  if (nm) {
    c.tp = tab + 48 * np;
    subset_tables(z0, L.KQ, tab + 48 * np);
  }
  rows_of_scheme<false>(L, c, N, y);
}

// Ŵᵀ of row groups g0:g1 from the lookup layout, for the batched path: out [K, ld] (ld = 16 (g1 − g0)),
// column j of row 16g + r at out[j ld + 16 (g − g0) + r], fp32 (out32) or bf16 rounded to nearest even
// (out16). Rows in lanes as in the GEMV: per column, the sign and group masks of 16 rows are tested in the
// column's quad of code bytes; salient columns take the residual formula with the stored sign2 word; N:M
// (keep bytes) zeroes the pruned rows of each column.
template <bool RC, bool CGB>
void dequant_lut_rows(const Lut& L, int64_t K, int64_t g0, int64_t g1, float* out32, uint16_t* out16) {
  const int64_t ld = 16 * (g1 - g0);
  std::vector<int32_t> cidx(K, -1);
  for (int64_t p = 0; p < L.S; ++p) cidx[L.sidx[p]] = static_cast<int32_t>(p);
  // blocks of columns in parallel, row groups inside: the 16-row stores of one column are consecutive,
  // so each output row is written front to back and a block's rows stay in cache
  at::parallel_for(0, L.T, 1, [&](int64_t tb, int64_t te) {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t t = tb; t < te; ++t) {
      for (int64_t rg = g0; rg < g1; ++rg) {
        const uint8_t* cp = L.codes + rg * L.KQ * 16;
        const int64_t col0 = 16 * (rg - g0);
        const __m512 a00 = lut_val(L, rg, t, A00), a01 = lut_val(L, rg, t, A01);
        const __m512 m00 = RC ? zero : lut_val(L, rg, t, M00), m01 = RC ? zero : lut_val(L, rg, t, M01);
        const bool sal = L.soff[t + 1] > L.soff[t];
        const __m512 a101 = sal ? lut_val(L, rg, t, A10_1) : zero, a102 = sal ? lut_val(L, rg, t, A10_2) : zero;
        const __m512 a111 = sal && CGB ? lut_val(L, rg, t, A11_1) : a101, a112 = sal && CGB ? lut_val(L, rg, t, A11_2) : a102;
        const __m512 m10 = sal && !RC ? lut_val(L, rg, t, M10) : zero, m11 = sal && !RC && CGB ? lut_val(L, rg, t, M11) : m10;
        const int64_t j1 = std::min(K, (t + 1) * L.B);
        for (int64_t j = t * L.B; j < j1; ++j) {
          const __m128i cb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cp + 16 * (j >> 2)));
          const int shift = code_shift(j);
          const __mmask16 ms = _mm_test_epi8_mask(cb, _mm_set1_epi8(static_cast<char>(1 << shift)));
          const __mmask16 mg = _mm_test_epi8_mask(cb, _mm_set1_epi8(static_cast<char>(2 << shift)));
          __m512 w;
          const int32_t p = cidx[j];
          if (p < 0) {
            w = _mm512_mask_blend_ps(mg, a00, a01);
            if (RC) w = _mm512_mul_ps(w, _mm512_mask_blend_ps(mg, _mm512_set1_ps(L.cs[j]), _mm512_set1_ps(L.cs[2 * K + j])));
            w = _mm512_mask_sub_ps(w, _knot_mask16(ms), zero, w);
            if (!RC) w = _mm512_add_ps(w, _mm512_mask_blend_ps(mg, m00, m01));
          } else {
            const __mmask16 g = CGB ? mg : 0, n2 = _cvtu32_mask16(~static_cast<uint32_t>(L.s2w[rg * L.S + p]) & 0xFFFFu);
            __m512 w1 = _mm512_mask_blend_ps(g, a101, a111), w2 = _mm512_mask_blend_ps(g, a102, a112);
            if (RC) {
              w1 = _mm512_mul_ps(w1, _mm512_mask_blend_ps(g, _mm512_set1_ps(L.cs[j]), _mm512_set1_ps(L.cs[2 * K + j])));
              w2 = _mm512_mul_ps(w2, _mm512_mask_blend_ps(g, _mm512_set1_ps(L.cs[K + j]), _mm512_set1_ps(L.cs[3 * K + j])));
            }
            w = _mm512_add_ps(_mm512_mask_sub_ps(w1, _knot_mask16(ms), zero, w1), _mm512_mask_sub_ps(w2, n2, zero, w2));
            if (!RC) w = _mm512_add_ps(w, _mm512_mask_blend_ps(g, m10, m11));
          }
          if (L.keep) {      // N:M: exact zeros at the rows' pruned positions
            const __m128i kb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(L.keep + (rg * L.KB + (j >> 3)) * 16));
            w = _mm512_maskz_mov_ps(_mm_test_epi8_mask(kb, _mm_set1_epi8(static_cast<char>(1 << (j & 7)))), w);
          }
          if (out16) store_bf16x16(w, out16 + j * ld + col0);
          else _mm512_storeu_ps(out32 + j * ld + col0, w);
        }
      }
    }
  });
}
