// Host check of the CUDA attention kernels' index math (no GPU needed):
//   nvcc -x cu -std=c++17 -I csrc/include -I csrc -I <cutlass>/include \
//        csrc/cuda/checks/two_stream_attention_index_check.cc -o /tmp/tsa_check && /tmp/tsa_check
// The fragment addressing of two_stream_attention_common.cuh is fed through an emulation of ldmatrix and
// mma.sync m16n8k16 written from the PTX ISA's fragment tables, and every product the kernels form
// (Q K^T, P V, the band, dband R, X^T Y, dband^T Q) is compared with a plain loop; the band / diagonal /
// chunk arithmetic is checked against the reference's r_row and by brute force.
// (A .cc file: setup.py builds csrc/**/*.cpp and *.cu into the extension, this is a standalone program.)
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/two_stream_attention_common.cuh"

using namespace pyobjectives;
using namespace pyobjectives::cuda::tsa;

static int failures = 0;
#define CHECK(cond, ...)                  \
  do {                                    \
    if (!(cond)) {                        \
      if (failures < 20) {                \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);         \
        std::printf("\n");                \
      }                                   \
      ++failures;                         \
    }                                     \
  } while (0)

// A "register" of two 16-bit elements, kept as floats (values are small integers: exact).
struct Reg {
  float lo = 0, hi = 0;
};

// ldmatrix x4 emulation: addr[lane] = element offset of the row start lane gives (matrix lane / 8).
static void ldsm(const std::vector<float>& smem, const int (&addr)[32], bool trans, Reg (&out)[32][4]) {
  for (int m = 0; m < 4; ++m)
    for (int l = 0; l < 32; ++l) {
      if (!trans) {  // (row l/4, cols 2(l%4), +1)
        const int base = addr[8 * m + l / 4];
        out[l][m] = {smem[base + 2 * (l % 4)], smem[base + 2 * (l % 4) + 1]};
      } else {  // (rows 2(l%4), +1, col l/4)
        out[l][m] = {smem[addr[8 * m + 2 * (l % 4)] + l / 4], smem[addr[8 * m + 2 * (l % 4) + 1] + l / 4]};
      }
    }
}

// mma m16n8k16 emulation: rebuild A (16x16), B (16x8) from the fragment tables, C += A B.
static void mma_emu(float (&c)[32][4], const Reg (&a)[32][4], const Reg (&b)[32][2]) {
  float A[16][16], Bm[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    A[g][2 * t] = a[l][0].lo, A[g][2 * t + 1] = a[l][0].hi;
    A[g + 8][2 * t] = a[l][1].lo, A[g + 8][2 * t + 1] = a[l][1].hi;
    A[g][2 * t + 8] = a[l][2].lo, A[g][2 * t + 9] = a[l][2].hi;
    A[g + 8][2 * t + 8] = a[l][3].lo, A[g + 8][2 * t + 9] = a[l][3].hi;
    Bm[2 * t][g] = b[l][0].lo, Bm[2 * t + 1][g] = b[l][0].hi;
    Bm[2 * t + 8][g] = b[l][1].lo, Bm[2 * t + 9][g] = b[l][1].hi;
  }
  for (int l = 0; l < 32; ++l)
    for (int e = 0; e < 4; ++e) {
      const RowCol rc = acc_elem(l, e);
      float s = 0;
      for (int k = 0; k < 16; ++k) s += A[rc.r][k] * Bm[k][rc.c];
      c[l][e] += s;
    }
}

static std::mt19937 rng(1234);
static float small() { return float(int(rng() % 7) - 3); }

// Swizzled [rows, D] tile holding X (row-major rows x D).
template <int D>
static std::vector<float> swizzled(const std::vector<float>& x, int rows) {
  std::vector<float> s(rows * D);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < D; ++c) s[swz<D>(r, c)] = x[r * D + c];
  return s;
}

template <int D>
static void check_swizzle() {
  for (int r = 0; r < 64; ++r) {
    std::vector<int> seen(D, 0);
    for (int c = 0; c < D; ++c) {
      const int o = swz<D>(r, c) - r * D;
      CHECK(o >= 0 && o < D, "swz out of row");
      if (o >= 0 && o < D) ++seen[o];
    }
    for (int c = 0; c < D; ++c) CHECK(seen[c] == 1, "swz not a bijection");
  }
  // eight consecutive rows at one 8-column chunk: 16-byte chunks in distinct bank groups
  for (int r0 = 0; r0 < 64; r0 += 8)
    for (int c = 0; c < D; c += 8) {
      int used = 0;
      for (int r = r0; r < r0 + 8; ++r) used |= 1 << ((swz<D>(r, c) * 2 / 16) % 8);
      CHECK(used == 0xff, "ldmatrix bank conflict D=%d r0=%d c=%d", D, r0, c);
    }
}

// Q (64 x D) K^T (BN x D) for every warp, as score_tile / mma_abt form it.
template <int D>
static void check_qkt() {
  using C = Cfg<D>;
  std::vector<float> q(64 * D), k(C::BN * D);
  for (auto& x : q) x = small();
  for (auto& x : k) x = small();
  const auto sq = swizzled<D>(q, 64), sk = swizzled<D>(k, C::BN);
  for (int w = 0; w < 4; ++w) {
    Reg qa[D / 16][32][4];
    for (int kk = 0; kk < D / 16; ++kk) {
      int addr[32];
      for (int l = 0; l < 32; ++l) {
        const RowCol rc = ldsm_a_lane(l);
        addr[l] = swz<D>(w * 16 + rc.r, kk * 16 + rc.c);
      }
      ldsm(sq, addr, false, qa[kk]);
    }
    float acc[C::NB][32][4] = {};
    for (int kk = 0; kk < D / 16; ++kk)
      for (int nb2 = 0; nb2 < C::NB / 2; ++nb2) {
        int addr[32];
        for (int l = 0; l < 32; ++l) {
          const RowCol rc = ldsm_bt_lane(l);
          addr[l] = swz<D>(nb2 * 16 + rc.r, kk * 16 + rc.c);
        }
        Reg bb[32][4];
        ldsm(sk, addr, false, bb);
        Reg b0[32][2], b1[32][2];
        for (int l = 0; l < 32; ++l) b0[l][0] = bb[l][0], b0[l][1] = bb[l][1], b1[l][0] = bb[l][2], b1[l][1] = bb[l][3];
        mma_emu(acc[2 * nb2], qa[kk], b0);
        mma_emu(acc[2 * nb2 + 1], qa[kk], b1);
      }
    for (int nb = 0; nb < C::NB; ++nb)
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 4; ++e) {
          const RowCol rc = acc_elem(l, e);
          const int i = w * 16 + rc.r, j = nb * 8 + rc.c;
          float ref = 0;
          for (int d = 0; d < D; ++d) ref += q[i * D + d] * k[j * D + d];
          CHECK(acc[nb][l][e] == ref, "QK^T D=%d w=%d i=%d j=%d: %f vs %f", D, w, i, j, acc[nb][l][e], ref);
        }
    // band: per n8 block of the band, k32 loads (score_tile's position term)
    std::vector<float> r(C::BAND * D);
    for (auto& x : r) x = small();
    const auto sr = swizzled<D>(r, C::BAND);
    for (int jb = 0; jb < C::BAND / 8; ++jb) {
      float c4[1][32][4] = {};
      for (int kk2 = 0; kk2 < D / 32; ++kk2) {
        int addr[32];
        for (int l = 0; l < 32; ++l) {
          const RowCol rc = ldsm_bt_k32_lane(l);
          addr[l] = swz<D>(jb * 8 + rc.r, kk2 * 32 + rc.c);
        }
        Reg bb[32][4];
        ldsm(sr, addr, false, bb);
        Reg b0[32][2], b1[32][2];
        for (int l = 0; l < 32; ++l) b0[l][0] = bb[l][0], b0[l][1] = bb[l][1], b1[l][0] = bb[l][2], b1[l][1] = bb[l][3];
        mma_emu(c4[0], qa[2 * kk2], b0);
        mma_emu(c4[0], qa[2 * kk2 + 1], b1);
      }
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 4; ++e) {
          const RowCol rc = acc_elem(l, e);
          const int i = w * 16 + rc.r, cb = jb * 8 + rc.c;
          float ref = 0;
          for (int d = 0; d < D; ++d) ref += q[i * D + d] * r[cb * D + d];
          CHECK(c4[0][l][e] == ref, "band D=%d", D);
        }
    }
  }
}

// P (16 x BN, from accumulators) V (BN x D) as mma_ab / c_to_a form it; also dband (16 x BAND) R_band.
template <int D>
static void check_pv() {
  using C = Cfg<D>;
  std::vector<float> v(C::BN * D), pm(16 * C::BN);
  for (auto& x : v) x = small();
  for (auto& x : pm) x = small();
  const auto sv = swizzled<D>(v, C::BN);
  float c[C::NB][32][4];
  for (int nb = 0; nb < C::NB; ++nb)
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) {
        const RowCol rc = acc_elem(l, e);
        c[nb][l][e] = pm[rc.r * C::BN + nb * 8 + rc.c];
      }
  float acc[D / 8][32][4] = {};
  for (int kb = 0; kb < C::NB / 2; ++kb) {
    Reg a[32][4];
    for (int l = 0; l < 32; ++l) {  // c_to_a
      a[l][0] = {c[2 * kb][l][0], c[2 * kb][l][1]};
      a[l][1] = {c[2 * kb][l][2], c[2 * kb][l][3]};
      a[l][2] = {c[2 * kb + 1][l][0], c[2 * kb + 1][l][1]};
      a[l][3] = {c[2 * kb + 1][l][2], c[2 * kb + 1][l][3]};
    }
    for (int nd2 = 0; nd2 < D / 16; ++nd2) {
      int addr[32];
      for (int l = 0; l < 32; ++l) {
        const RowCol rc = ldsm_a_lane(l);
        addr[l] = swz<D>(kb * 16 + rc.r, nd2 * 16 + rc.c);
      }
      Reg bb[32][4];
      ldsm(sv, addr, true, bb);
      Reg b0[32][2], b1[32][2];
      for (int l = 0; l < 32; ++l) b0[l][0] = bb[l][0], b0[l][1] = bb[l][1], b1[l][0] = bb[l][2], b1[l][1] = bb[l][3];
      mma_emu(acc[2 * nd2], a, b0);
      mma_emu(acc[2 * nd2 + 1], a, b1);
    }
  }
  for (int nd = 0; nd < D / 8; ++nd)
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) {
        const RowCol rc = acc_elem(l, e);
        const int d = nd * 8 + rc.c;
        float ref = 0;
        for (int j = 0; j < C::BN; ++j) ref += pm[rc.r * C::BN + j] * v[j * D + d];
        CHECK(acc[nd][l][e] == ref, "PV D=%d", D);
      }

  // dband [16, DB_STRIDE] (plain rows) times R_band (swizzled [BAND, D]), band_times_r
  std::vector<float> db(16 * C::DB_STRIDE), r(C::BAND * D);
  for (auto& x : db) x = small();
  for (auto& x : r) x = small();
  const auto sr = swizzled<D>(r, C::BAND);
  float acc2[D / 8][32][4] = {};
  for (int kb = 0; kb < C::BAND / 16; ++kb) {
    int addr[32];
    for (int l = 0; l < 32; ++l) {
      const RowCol rc = ldsm_a_lane(l);
      addr[l] = rc.r * C::DB_STRIDE + kb * 16 + rc.c;
    }
    Reg a[32][4];
    ldsm(db, addr, false, a);
    for (int nd2 = 0; nd2 < D / 16; ++nd2) {
      for (int l = 0; l < 32; ++l) {
        const RowCol rc = ldsm_a_lane(l);
        addr[l] = swz<D>(kb * 16 + rc.r, nd2 * 16 + rc.c);
      }
      Reg bb[32][4];
      ldsm(sr, addr, true, bb);
      Reg b0[32][2], b1[32][2];
      for (int l = 0; l < 32; ++l) b0[l][0] = bb[l][0], b0[l][1] = bb[l][1], b1[l][0] = bb[l][2], b1[l][1] = bb[l][3];
      mma_emu(acc2[2 * nd2], a, b0);
      mma_emu(acc2[2 * nd2 + 1], a, b1);
    }
  }
  for (int nd = 0; nd < D / 8; ++nd)
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) {
        const RowCol rc = acc_elem(l, e);
        float ref = 0;
        for (int cb = 0; cb < C::BAND; ++cb) ref += db[rc.r * C::DB_STRIDE + cb] * r[cb * D + nd * 8 + rc.c];
        CHECK(acc2[nd][l][e] == ref, "dband R D=%d", D);
      }
}

// X^T Y (dk / dv: X [64, BN] with P_STRIDE rows, Y swizzled [64, D]) as mma_xt_y forms it, and
// dband^T Q (dr: fp32 band [64, BAND + 4], A fragments built by hand).
template <int D>
static void check_transposed() {
  using C = Cfg<D>;
  std::vector<float> x(64 * C::P_STRIDE), y(64 * D);
  for (auto& e : x) e = small();
  for (auto& e : y) e = small();
  const auto sy = swizzled<D>(y, 64);
  constexpr int kKeyWarps = C::BN / 16, DW = D * kKeyWarps / 4;
  for (int w = 0; w < 4; ++w) {
    const int kr0 = (w % kKeyWarps) * 16, d0 = (w / kKeyWarps) * DW;
    float acc[DW / 8][32][4] = {};
    for (int kb = 0; kb < 4; ++kb) {
      int addr[32];
      for (int l = 0; l < 32; ++l) {
        const RowCol rc = ldsm_at_lane(l);
        addr[l] = (kb * 16 + rc.r) * C::P_STRIDE + kr0 + rc.c;
      }
      Reg a[32][4];
      ldsm(x, addr, true, a);
      for (int nd2 = 0; nd2 < DW / 16; ++nd2) {
        for (int l = 0; l < 32; ++l) {
          const RowCol rc = ldsm_a_lane(l);
          addr[l] = swz<D>(kb * 16 + rc.r, d0 + nd2 * 16 + rc.c);
        }
        Reg bb[32][4];
        ldsm(sy, addr, true, bb);
        Reg b0[32][2], b1[32][2];
        for (int l = 0; l < 32; ++l) b0[l][0] = bb[l][0], b0[l][1] = bb[l][1], b1[l][0] = bb[l][2], b1[l][1] = bb[l][3];
        mma_emu(acc[2 * nd2], a, b0);
        mma_emu(acc[2 * nd2 + 1], a, b1);
      }
    }
    for (int nd = 0; nd < DW / 8; ++nd)
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 4; ++e) {
          const RowCol rc = acc_elem(l, e);
          const int key = kr0 + rc.r, d = d0 + nd * 8 + rc.c;
          float ref = 0;
          for (int i = 0; i < 64; ++i) ref += x[i * C::P_STRIDE + key] * y[i * D + d];
          CHECK(acc[nd][l][e] == ref, "X^T Y D=%d w=%d", D, w);
        }
  }
  // dr: band [64, BAND + 4] fp32, units of (16 band columns x 64 dims)
  constexpr int kUnits = (C::BAND / 16) * (D / 64) / 4;
  std::vector<float> band(64 * (C::BAND + 4));
  for (auto& e : band) e = small();
  for (int w = 0; w < 4; ++w)
    for (int i = 0; i < kUnits; ++i) {
      const int unit = w * kUnits + i, cb0 = (unit / (D / 64)) * 16, dh = (unit % (D / 64)) * 64;
      float acc[8][32][4] = {};
      for (int kb = 0; kb < 4; ++kb) {
        Reg a[32][4];
        for (int l = 0; l < 32; ++l) {
          const int gq = l / 4, t = l % 4, r0 = kb * 16 + 2 * t;
          auto at = [&](int row, int col) { return band[row * (C::BAND + 4) + col]; };
          a[l][0] = {at(r0, cb0 + gq), at(r0 + 1, cb0 + gq)};
          a[l][1] = {at(r0, cb0 + gq + 8), at(r0 + 1, cb0 + gq + 8)};
          a[l][2] = {at(r0 + 8, cb0 + gq), at(r0 + 9, cb0 + gq)};
          a[l][3] = {at(r0 + 8, cb0 + gq + 8), at(r0 + 9, cb0 + gq + 8)};
        }
        for (int nd2 = 0; nd2 < 4; ++nd2) {
          int addr[32];
          for (int l = 0; l < 32; ++l) {
            const RowCol rc = ldsm_a_lane(l);
            addr[l] = swz<D>(kb * 16 + rc.r, dh + nd2 * 16 + rc.c);
          }
          Reg bb[32][4];
          ldsm(sy, addr, true, bb);
          Reg b0[32][2], b1[32][2];
          for (int l = 0; l < 32; ++l) b0[l][0] = bb[l][0], b0[l][1] = bb[l][1], b1[l][0] = bb[l][2], b1[l][1] = bb[l][3];
          mma_emu(acc[2 * nd2], a, b0);
          mma_emu(acc[2 * nd2 + 1], a, b1);
        }
      }
      for (int nd = 0; nd < 8; ++nd)
        for (int l = 0; l < 32; ++l)
          for (int e = 0; e < 4; ++e) {
            const RowCol rc = acc_elem(l, e);
            const int cb = cb0 + rc.r, d = dh + nd * 8 + rc.c;
            float ref = 0;
            for (int row = 0; row < 64; ++row) ref += band[row * (C::BAND + 4) + cb] * y[row * D + d];
            CHECK(acc[nd][l][e] == ref, "dband^T Q D=%d", D);
          }
    }
}

// Band / diagonal / T5 / chunk arithmetic against the reference's definitions.
template <int BN>
static void check_bands() {
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t Lq = 1 + rng() % 300, M = rng() % 3 == 0 ? 0 : rng() % 200, Lk = Lq + M;
    const int64_t n_mb = n_row_blocks(Lq), n_nb = ceil_div(Lk, BN), n_diag = n_diagonals<BN>(n_mb, n_nb);
    for (int64_t mb = 0; mb < n_mb; ++mb)
      for (int64_t nb = 0; nb < n_nb; ++nb) {
        const int64_t m0 = mb * kBM, n0 = nb * BN, t0 = band_start(Lq, m0, n0);
        const int64_t di = (n0 - m0) / BN + (n_mb - 1) * (kBM / BN);
        CHECK(di >= 0 && di < n_diag && diagonal_band_start<BN>(Lq, n_mb, di) == t0, "diagonal of tile");
        for (int s = 0; s < 4; ++s) {
          const int64_t pos = m0 + rng() % kBM, c = rng() % BN;
          const int off = band_offset(m0, pos);
          CHECK(off >= 0 && off < kBM, "band offset");
          CHECK(t0 + off + c == r_row(Lq, pos, n0 + c), "skew != r_row");
          CHECK(off + c < kBM + BN - 1, "band column past BM + BN - 1");
          CHECK(t5_column(Lq, pos, n0 + c) == r_row(Lq, pos, n0 + c) - 1, "t5 column");
        }
      }
    for (int64_t t = -200; t < Lq + Lk + 200; ++t) {
      int64_t lo, hi;
      diagonals_covering<BN>(Lq, n_mb, n_diag, t, &lo, &hi);
      for (int64_t di = 0; di < n_diag; ++di) {
        const int64_t cb = t - diagonal_band_start<BN>(Lq, n_mb, di);
        const bool covers = cb >= 0 && cb < kBM + BN - 1;
        CHECK(covers == (di >= lo && di <= hi), "diagonals_covering t=%lld di=%lld", (long long)t, (long long)di);
      }
    }
    // chunk slots: a counting sort by block, chunks of <= BM rows per block
    const int64_t P = rng() % 400;
    std::vector<int64_t> counts(n_mb, 0);
    for (int64_t i = 0; i < P; ++i)
      if (rng() % 5) ++counts[rng() % 3 == 0 ? 0 : rng() % n_mb];  // skewed: many rows in one block
    int64_t chunks = 0;
    for (int64_t c : counts) chunks += ceil_div(c, kBM);
    CHECK(chunks <= max_chunks(P, Lq), "chunk slots %lld > %lld", (long long)chunks, (long long)max_chunks(P, Lq));
  }
}

int main() {
  check_swizzle<64>();
  check_swizzle<128>();
  check_qkt<64>();
  check_qkt<128>();
  check_pv<64>();
  check_pv<128>();
  check_transposed<64>();
  check_transposed<128>();
  check_bands<Cfg<64>::BN>();
  check_bands<Cfg<128>::BN>();
  std::printf(failures == 0 ? "all index checks passed\n" : "%d index checks failed\n", failures);
  return failures == 0 ? 0 : 1;
}
