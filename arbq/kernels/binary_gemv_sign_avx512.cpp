// Table-lookup GEMV for the sign scheme (ŵ = μ + α s per row and block), read from the "binary" layout's own
// sign plane [N, KB] in place (no load-time copy), #included by binary_gemv.cpp inside `#if ARBQ_AVX512`, after
// binary_gemv_lut_avx512.cpp (subset_tables). Rows are the vector lanes: 16 rows per row group, R row groups per
// tile share every table load. Each row group reads its 16 rows 64 bytes (512 columns) at a time and transposes
// the 16 × 16 dwords in registers (sign_chunk), so vector d holds dword d (32 columns) of all 16 rows; the same
// bytes of the next tile's rows are prefetched into L2 as it goes (the rows are 64 short strided streams, which
// the hardware prefetchers do not follow: measured 1.6-1.75x faster cold than without, and 1.5x faster hot than
// one masked gather per dword, at 11008 x 4096 on an AMD EPYC); per quad of 4
// columns the 4 sign bits u (1 = +1) index a 16-entry table of subset sums P[u] = Σ_{i∈u} x_{4q+i}, so over block t
//   Σ_j s_j x_j = 2 S_t − X_t   (S_t = Σ of the block's P lookups, X_t = Σ_{j∈t} x_j),
//   y_r += α_{r,t} (2 S_t − X_t) + μ_{r,t} X_t.
// int16 tables (ARBQ_LUT16): x is rounded per block to q = rint(x / s_t), s_t = max_{j∈t} |x_j| / 8191 (a 4-column
// sum fits int16), P and X_t = s_t Σ q from the same q, so the product is exact for the rounded inputs; vpermb
// puts byte c of the 16 rows' dwords into words 2r, 2r+1 (row r's low and high nibble), vpermw looks the 32
// words up in the octet's table [P(quad 2o) | P(quad 2o+1)] and vpdpwssd adds both into row r's int32 lane.
// fp32 tables: vpermps on each quad's 16 entries (it reads the low 4 bits of the shifted dword).
// Block size a multiple of 32 (whole dwords per block); columns past K have zero table entries.

struct SignLut {
  int64_t N, K, KB, N16, T, B, V, KD;   // KD = ceil(KB / 4) dwords per row
  const uint8_t* s1;                    // [N, KB] sign plane, LSB first (bit 1 = +1)
  const void* vt;                       // [N16, T, V, 16] values, rows last (fp16 or fp32, vscale applied)
  bool vhalf;
  int a, m;                             // lanes of α and μ in the values (kZeroLane: none)
};

inline __m512 sign_val(const SignLut& L, int64_t rg, int64_t t, int lane) {
  if (lane == kZeroLane) return _mm512_setzero_ps();
  const int64_t off = ((rg * L.T + t) * L.V + lane) * 16;
  if (L.vhalf)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(L.vt) + off)));
  return _mm512_loadu_ps(static_cast<const float*>(L.vt) + off);
}

// Rows 16 rg .. 16 rg + 15 of the sign plane: base pointer and row count.
struct SignRows {
  const uint8_t* base;
  int64_t rows;
};

inline SignRows sign_rows(const SignLut& L, int64_t rg) {
  const int64_t i0 = 16 * rg;
  return {L.s1 + std::min(i0, L.N) * L.KB, std::max<int64_t>(0, std::min<int64_t>(16, L.N - i0))};
}

// v[c] ← (v[0][c], …, v[15][c]): the 16 × 16 dword transpose (in-lane unpacks, then 128-bit lane shuffles).
inline void transpose16(__m512i* v) {
  __m512i t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);      // lane L: v2i[4L] v2i+1[4L] v2i[4L+1] v2i+1[4L+1]
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);  //         … [4L+2], [4L+3]
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {                                     // u[4i+k] lane L: rows 4i..4i+3 of column 4L+k
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    const __m512i a = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88), b = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD),
                  c = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88), d = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
    v[k] = _mm512_shuffle_i32x4(a, c, 0x88);
    v[8 + k] = _mm512_shuffle_i32x4(a, c, 0xDD);
    v[4 + k] = _mm512_shuffle_i32x4(b, d, 0x88);
    v[12 + k] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

// out[j] = dword c0 + j (bytes 4 (c0 + j) … + 3) of the 16 rows, j < 16: one 64-byte load per row, masked past the
// row's last byte (never read beyond it, so never beyond the plane), rows past N zero; the line `ahead` bytes
// further on of each row is prefetched (a prefetch never faults, so past the plane's end is harmless).
inline void sign_chunk(const SignLut& L, const SignRows& w, int64_t c0, int64_t ahead, __m512i* out) {
  const int64_t b0 = 4 * c0, nb = std::min<int64_t>(64, L.KB - b0);
  const __mmask64 bm = nb >= 64 ? ~0ull : ((1ull << nb) - 1);
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    out[r] = r < w.rows ? _mm512_maskz_loadu_epi8(bm, w.base + r * L.KB + b0) : _mm512_setzero_si512();
    _mm_prefetch(reinterpret_cast<const char*>(w.base + r * L.KB + b0 + ahead), _MM_HINT_T1);
  }
  transpose16(out);
}

template <int R, bool I16>
void sign_tile(const SignLut& L, const void* tables, const float* steps, const float* xblk, int64_t rg0, float* y_out) {
  __m512 y[R];
  SignRows rw[R];
  alignas(64) __m512i chunk[R][16];                   // the current 16 dwords of every row group, transposed
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) { y[r] = _mm512_setzero_ps(); rw[r] = sign_rows(L, rg0 + r); }
  const int64_t dpb = L.B / 32;
#if ARBQ_LUT16
  // vpermb indices: word 2r and 2r+1 <- byte c of dword r (odd bytes of the words zeroed by the mask)
  alignas(64) static const struct Pick { uint8_t b[4][64]; Pick() { for (int c = 0; c < 4; ++c) for (int i = 0; i < 64; ++i) b[c][i] = static_cast<uint8_t>(4 * (i / 4) + c); } } pick;
  const __m512i shifts = _mm512_set1_epi32(0x00040000), m0f = _mm512_set1_epi16(0x0F), odd = _mm512_set1_epi32(0x00100000),
                ones = _mm512_set1_epi16(1);
#endif
  for (int64_t t = 0; t < L.T; ++t) {
    const int64_t d0 = t * dpb, d1 = std::min(d0 + dpb, L.KD);
    __m512 S[R];
    __m512i Si[R];      // int16 tables: exact integer sums
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) { S[r] = _mm512_setzero_ps(); Si[r] = _mm512_setzero_si512(); }
    for (int64_t d = d0; d < d1; ++d) {
      if ((d & 15) == 0) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) sign_chunk(L, rw[r], d, 16 * R * L.KB, chunk[r]);
      }
      __m512i g[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) g[r] = chunk[r][d & 15];
      if constexpr (I16) {
#if ARBQ_LUT16
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const __m512i tb = _mm512_load_si512(static_cast<const int16_t*>(tables) + 32 * (4 * d + c));
          const __m512i pc = _mm512_load_si512(pick.b[c]);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m512i w = _mm512_srlv_epi16(_mm512_maskz_permutexvar_epi8(0x5555555555555555ull, pc, g[r]), shifts);
            const __m512i idx = _mm512_ternarylogic_epi32(w, m0f, odd, 0xEA);          // (w & 0xF) | parity << 4
            Si[r] = _mm512_dpwssd_epi32(Si[r], _mm512_permutexvar_epi16(idx, tb), ones);
          }
        }
#endif
      } else {
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          const __m512 tb = _mm512_load_ps(static_cast<const float*>(tables) + 16 * (8 * d + k));
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) S[r] = _mm512_add_ps(S[r], _mm512_permutexvar_ps(_mm512_srli_epi32(g[r], 4 * k), tb));
        }
      }
    }
    if constexpr (I16) {
      const __m512 st = _mm512_set1_ps(steps[t]);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) S[r] = _mm512_mul_ps(_mm512_cvtepi32_ps(Si[r]), st);
    }
    const __m512 xt = _mm512_set1_ps(xblk[t]);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 a = sign_val(L, rg0 + r, t, L.a), mu = sign_val(L, rg0 + r, t, L.m);
      y[r] = _mm512_fmadd_ps(a, _mm512_fmsub_ps(_mm512_set1_ps(2.f), S[r], xt), y[r]);
      y[r] = _mm512_fmadd_ps(mu, xt, y[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const int64_t i0 = (rg0 + r) * 16, n = std::min<int64_t>(16, L.N - i0);
    if (n > 0) _mm512_mask_storeu_ps(y_out + i0, first_lanes(n), y[r]);
  }
}

// y [N] = W x for one x row [K] (the module comment); i16: int16 tables where compiled.
void gemv_sign(const SignLut& L, const float* x, float* y, bool i16) {
  const int64_t kp = 32 * L.KD;                       // columns covered by the dwords read (zero past K)
  static thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(kp + 16 * kp / 4 + 64 + 2 * L.T);
  if (scratch.size() < need) scratch.assign(need, 0.f);
  float* q = scratch.data();
  float* tab = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(q + kp) + 63) & ~uintptr_t(63));
  float* steps = tab + 16 * kp / 4;
  float* xblk = steps + L.T;
  std::fill(q + L.K, q + kp, 0.f);
  const bool use16 = ARBQ_LUT16 && i16;
  if (use16) {        // X_t from the rounded inputs (integers: their sum is exact), so the product is exact for them
    quantize_blocks(x, L.K, L.B, 8191.f, steps, nullptr, q);
    block_sums(q, L.K, L.B, L.T, xblk);
    for (int64_t t = 0; t < L.T; ++t) xblk[t] *= steps[t];
  } else {
    std::copy(x, x + L.K, q);
    block_sums(x, L.K, L.B, L.T, xblk);
  }
  const void* tables = tab;
#if ARBQ_LUT16
  if (use16) {
    subset_tables(q, kp / 4, reinterpret_cast<int16_t*>(tab));
  } else
#endif
    subset_tables(q, kp / 4, tab);
  constexpr int R = 4;
  const int64_t tiles = L.N16 / R;
  const int64_t grain = 16 * L.N16 < 1024 ? std::max<int64_t>(tiles, 1)
                                          : std::max<int64_t>(1, (262144 + 16 * R * kp - 1) / (16 * R * kp));
  at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g)
      use16 ? sign_tile<R, true>(L, tables, steps, xblk, g * R, y) : sign_tile<R, false>(L, tables, steps, xblk, g * R, y);
  });
  for (int64_t rg = tiles * R; rg < L.N16; ++rg)
    use16 ? sign_tile<1, true>(L, tables, steps, xblk, rg, y) : sign_tile<1, false>(L, tables, steps, xblk, rg, y);
}
