// The deployed DGC layer's gathered convolution on the CPU, reading the kept kernel rows in place.
//
// Su et al., "Dynamic Group Convolution for Accelerating Convolutional Neural Networks", ECCV
// 2020. For each example b and head i, with the K kept input channels c_k = index[b, i, k] and
// their gated saliencies s_k = scale[b, i, k]:
//
//   out[b, o*h + i, p] = bias[o*h + i]
//                        + sum_k sum_t s_k * x[b, c_k, tap_t(p)] * W[o*h + i, c_k, t]
//
// (t runs over the kh*kw taps, tap_t(p) the input position tap t of output position p reads,
// zero outside the map). The weight is read as `rows` (h*Cin, kh*kw, Opad): row i*Cin + c
// holds W[o*h + i, c, t] at [t, o], zero for o >= Cout/h. A head's kept rows are read where they
// lie, so no kernel is copied per example: the work is the kept multiply-adds, one pass over the
// kept rows per example and head, and a scaled, zero-padded copy of its K input channels
// (whose taps the tiles read in place, or pack first on short rows). The kept channels come
// either as index/scale or are selected here from the saliencies g (select_kept below).
//
// Plain C++ with GCC's vector extensions (64- or 32-byte vectors; the compiler maps them to the
// machine's SIMD width), compiled by dynaconv.native at first use and called through ctypes.
// One thread: the calling one.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

template <typename T, int VB>
struct Vec {
  typedef T type __attribute__((vector_size(VB)));
  static constexpr int lanes = VB / sizeof(T);
};

struct Conv {
  int64_t batch, cin, height, width;
  int64_t heads, keep, o_head, o_pad;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w;
  // strides of index and scale (values) over examples and heads; each row is contiguous
  int64_t index_sb, index_sh, scale_sb, scale_sh;
};

// Where the taps read: the kept channels of one head, scaled and zero-padded (`planes`, K planes
// of padded_h x padded_w), the plane offset of each output position's first tap (`origins`,
// padded to whole tiles with 0: those columns feed no stored output) and each tap's offset.
struct Taps {
  int64_t padded_h, padded_w;
  std::vector<int64_t> origins, offsets;
};

Taps tap_geometry(const Conv& c, int64_t tile) {
  Taps g;
  const int64_t bottom = (c.out_h - 1) * c.sh + (c.kh - 1) * c.dh + 1;
  const int64_t right = (c.out_w - 1) * c.sw + (c.kw - 1) * c.dw + 1;
  g.padded_h = std::max(bottom, c.ph + c.height);
  g.padded_w = std::max(right, c.pw + c.width);
  const int64_t positions = c.out_h * c.out_w;
  const int64_t tiles = (positions + tile - 1) / tile;
  g.origins.assign(static_cast<size_t>(tiles * tile), 0);
  for (int64_t p = 0; p < positions; ++p) {
    g.origins[p] = (p / c.out_w) * c.sh * g.padded_w + (p % c.out_w) * c.sw;
  }
  for (int64_t ty = 0; ty < c.kh; ++ty) {
    for (int64_t tx = 0; tx < c.kw; ++tx) g.offsets.push_back(ty * c.dh * g.padded_w + tx * c.dw);
  }
  return g;
}

template <typename T>
void pad_planes(const Conv& c, const Taps& g, const T* x, const int64_t* index, const T* scale,
                T* planes) {
  const int64_t plane = g.padded_h * g.padded_w;
  std::fill(planes, planes + c.keep * plane, T(0));
  for (int64_t k = 0; k < c.keep; ++k) {
    const T* src = x + index[k] * c.height * c.width;
    const T s = scale[k];
    for (int64_t y = 0; y < c.height; ++y) {
      T* dst = planes + k * plane + (y + c.ph) * g.padded_w + c.pw;
      for (int64_t xx = 0; xx < c.width; ++xx) dst[xx] = s * src[y * c.width + xx];
    }
  }
}

// Columns for the tile of output positions [p0, p0 + tile): cols[(k*T + t)*tile + j].
template <typename T>
void pack_columns(const Conv& c, const Taps& g, const T* planes, int64_t p0, int64_t tile,
                  T* cols) {
  const int64_t plane = g.padded_h * g.padded_w;
  const int64_t* origins = g.origins.data() + p0;
  for (int64_t k = 0; k < c.keep; ++k) {
    for (const int64_t offset : g.offsets) {
      const T* src = planes + k * plane + offset;
      for (int64_t j = 0; j < tile; ++j) cols[j] = src[origins[j]];
      cols += tile;
    }
  }
}

// One tile: PT output positions x NO vectors of output channels, accumulated in registers.
template <typename T, int VB, int PT, int NO>
void tile_product(const Conv& c, const T* cols, const T* const* kept_rows, int64_t o0, T* acc_out) {
  typedef typename Vec<T, VB>::type V;
  constexpr int L = Vec<T, VB>::lanes;
  const int64_t taps = c.kh * c.kw;
  V acc[PT][NO];
#pragma GCC unroll 32
  for (int j = 0; j < PT; ++j) {
#pragma GCC unroll 8
    for (int n = 0; n < NO; ++n) acc[j][n] = V{} ;
  }
  for (int64_t k = 0; k < c.keep; ++k) {
    const T* row = kept_rows[k] + o0;
    for (int64_t t = 0; t < taps; ++t, row += c.o_pad, cols += PT) {
      V w[NO];
#pragma GCC unroll 8
      for (int n = 0; n < NO; ++n) std::memcpy(&w[n], row + n * L, sizeof(V));
#pragma GCC unroll 32
      for (int j = 0; j < PT; ++j) {
        const T b = cols[j];
#pragma GCC unroll 8
        for (int n = 0; n < NO; ++n) acc[j][n] += w[n] * b;
      }
    }
  }
  std::memcpy(acc_out, acc, sizeof(acc));
}

template <typename T, int VB, int PT, int NO>
void store_tile(const Conv& c, const T* acc, const T* bias, int64_t head, int64_t o0, int64_t p0,
                int64_t count, T* out) {
  constexpr int L = Vec<T, VB>::lanes;
  const int64_t positions = c.out_h * c.out_w;
  const int64_t o_end = std::min<int64_t>(c.o_head, o0 + NO * L);
  for (int64_t o = o0; o < o_end; ++o) {
    const int64_t channel = o * c.heads + head;
    const T shift = bias ? bias[channel] : T(0);
    T* dst = out + channel * positions + p0;
    const int64_t lane = o - o0, n = lane / L, l = lane % L;
    for (int64_t j = 0; j < count; ++j) dst[j] = acc[(j * NO + n) * L + l] + shift;
  }
}

// The direct path for wide maps: a tile is PT positions of one output row, whose taps read
// the padded planes in place (stride sw apart): no packed columns.
template <typename T, int VB, int PT, int NO, bool UNIT>
void row_tile(const Conv& c, const Taps& g, const T* base, const T* const* kept_rows, int64_t o0,
              T* acc_out) {
  typedef typename Vec<T, VB>::type V;
  constexpr int L = Vec<T, VB>::lanes;
  const int64_t plane = g.padded_h * g.padded_w, sw = UNIT ? 1 : c.sw;
  const int64_t taps = c.kh * c.kw;
  const int64_t* offsets = g.offsets.data();
  V acc[PT][NO];
#pragma GCC unroll 32
  for (int j = 0; j < PT; ++j) {
#pragma GCC unroll 8
    for (int n = 0; n < NO; ++n) acc[j][n] = V{};
  }
  for (int64_t k = 0; k < c.keep; ++k, base += plane) {
    const T* row = kept_rows[k] + o0;
    for (int64_t t = 0; t < taps; ++t, row += c.o_pad) {
      const T* src = base + offsets[t];
      V w[NO];
#pragma GCC unroll 8
      for (int n = 0; n < NO; ++n) std::memcpy(&w[n], row + n * L, sizeof(V));
#pragma GCC unroll 32
      for (int j = 0; j < PT; ++j) {
        const T b = src[j * sw];
#pragma GCC unroll 8
        for (int n = 0; n < NO; ++n) acc[j][n] += w[n] * b;
      }
    }
  }
  std::memcpy(acc_out, acc, sizeof(acc));
}

template <typename T, int VB, int PT, int NO, bool UNIT>
void head_direct(const Conv& c, const Taps& g, const T* x, const int64_t* index, const T* scale,
                 const T* rows,
                 const T* bias, int64_t head, T* out, std::vector<T>& planes,
                 std::vector<const T*>& kept_rows) {
  constexpr int L = Vec<T, VB>::lanes;
  const int64_t taps = c.kh * c.kw;
  // slack: the last tile of a row reads up to PT positions past the row's end
  const int64_t slack = PT * c.sw + g.padded_w;
  planes.resize(static_cast<size_t>(c.keep * g.padded_h * g.padded_w + slack));
  pad_planes(c, g, x, index, scale, planes.data());
  std::fill(planes.end() - slack, planes.end(), T(0));
  kept_rows.resize(static_cast<size_t>(c.keep));
  for (int64_t k = 0; k < c.keep; ++k) {
    kept_rows[k] = rows + (head * c.cin + index[k]) * taps * c.o_pad;
  }
  alignas(64) T acc[PT * NO * L];
  for (int64_t o0 = 0; o0 < c.o_head; o0 += NO * L) {
    for (int64_t oy = 0; oy < c.out_h; ++oy) {
      for (int64_t ox = 0; ox < c.out_w; ox += PT) {
        const T* base = planes.data() + oy * c.sh * g.padded_w + ox * c.sw;
        row_tile<T, VB, PT, NO, UNIT>(c, g, base, kept_rows.data(), o0, acc);
        const int64_t count = std::min<int64_t>(PT, c.out_w - ox);
        store_tile<T, VB, PT, NO>(c, acc, bias, head, o0, oy * c.out_w + ox, count, out);
      }
    }
  }
}

template <typename T, int VB, int PT, int NO, bool UNIT>
void run_direct(const Conv& c, const T* x, const int64_t* index, const T* scale, const T* rows,
                const T* bias, T* out) {
  thread_local std::vector<T> planes;
  thread_local std::vector<const T*> kept_rows;
  const Taps g = tap_geometry(c, 1);
  const int64_t positions = c.out_h * c.out_w, cout = c.heads * c.o_head;
  for (int64_t b = 0; b < c.batch; ++b) {
    const T* xb = x + b * c.cin * c.height * c.width;
    for (int64_t i = 0; i < c.heads; ++i) {
      head_direct<T, VB, PT, NO, UNIT>(c, g, xb, index + b * c.index_sb + i * c.index_sh,
                                   scale + b * c.scale_sb + i * c.scale_sh, rows, bias, i,
                                   out + b * cout * positions, planes, kept_rows);
    }
  }
}

template <typename T, int VB, int PT, int NO>
void head_product(const Conv& c, const Taps& g, const T* x, const int64_t* index, const T* scale,
                  const T* rows,
                  const T* bias, int64_t head, T* out, std::vector<T>& planes,
                  std::vector<T>& cols, std::vector<const T*>& kept_rows) {
  constexpr int L = Vec<T, VB>::lanes;
  const int64_t taps = c.kh * c.kw, positions = c.out_h * c.out_w;
  const int64_t tiles = (positions + PT - 1) / PT;
  const int64_t depth = c.keep * taps;
  planes.resize(static_cast<size_t>(c.keep * g.padded_h * g.padded_w));
  pad_planes(c, g, x, index, scale, planes.data());
  cols.resize(static_cast<size_t>(tiles * depth * PT));
  for (int64_t tile = 0; tile < tiles; ++tile) {
    pack_columns(c, g, planes.data(), tile * PT, PT, cols.data() + tile * depth * PT);
  }
  kept_rows.resize(static_cast<size_t>(c.keep));
  for (int64_t k = 0; k < c.keep; ++k) {
    kept_rows[k] = rows + (head * c.cin + index[k]) * taps * c.o_pad;
  }
  alignas(64) T acc[PT * NO * L];
  for (int64_t o0 = 0; o0 < c.o_head; o0 += NO * L) {
    for (int64_t tile = 0; tile < tiles; ++tile) {
      tile_product<T, VB, PT, NO>(c, cols.data() + tile * depth * PT, kept_rows.data(), o0, acc);
      const int64_t p0 = tile * PT, count = std::min<int64_t>(PT, positions - p0);
      store_tile<T, VB, PT, NO>(c, acc, bias, head, o0, p0, count, out);
    }
  }
}

template <typename T, int VB, int PT, int NO>
void run_all(const Conv& c, const T* x, const int64_t* index, const T* scale, const T* rows,
             const T* bias, T* out) {
  thread_local std::vector<T> planes, cols;
  thread_local std::vector<const T*> kept_rows;
  const Taps g = tap_geometry(c, PT);
  const int64_t positions = c.out_h * c.out_w, cout = c.heads * c.o_head;
  for (int64_t b = 0; b < c.batch; ++b) {
    const T* xb = x + b * c.cin * c.height * c.width;
    for (int64_t i = 0; i < c.heads; ++i) {
      head_product<T, VB, PT, NO>(c, g, xb, index + b * c.index_sb + i * c.index_sh,
                              scale + b * c.scale_sb + i * c.scale_sh, rows, bias, i,
                              out + b * cout * positions, planes, cols, kept_rows);
    }
  }
}

// The tile shape: NO vectors of a head's output channels and PT output positions, PT * NO
// accumulators (at most 24 of the 32 vector registers). Rows of 4 positions and more run direct
// tiles of one row each, reading the padded planes in place, except on short rows (4-7
// positions) of heads with 4 or more vectors: there each broadcast input feeds more vectors in
// packed tiles that span rows (the columns packed first). Measured (benchmarks/NOTES.md, as
// ÷ the dense conv or ms): 256 channels on 8x8 maps direct 0.49x, packed 0.67x; 512 channels
// on 4x4 maps packed 0.50x, direct (4 positions x 4 vectors) 0.58x; 64 channels (one vector
// per head) on 8x8 maps at batch 256, direct 5.4 ms, packed 10.1 ms.
template <typename T, int VB>
int run_width(const Conv& c, const T* x, const int64_t* index, const T* scale, const T* rows,
        const T* bias, T* out) {
  constexpr int L = Vec<T, VB>::lanes;
  if (c.o_pad % L != 0 || c.o_pad < c.o_head) return 1;
  const int64_t vectors = c.o_pad / L, positions = c.out_h * c.out_w;
  // Every tile reads whole vectors of its head's rows: NO divides the head's vector count.
  const bool unit = c.sw == 1;
  const bool rows_wide = c.out_w >= 16 || (c.out_w >= 8 && vectors >= 2);
  if (rows_wide && vectors % 3 == 0) {
    unit ? run_direct<T, VB, 8, 3, true>(c, x, index, scale, rows, bias, out)
         : run_direct<T, VB, 8, 3, false>(c, x, index, scale, rows, bias, out);
  } else if (rows_wide && vectors % 2 == 0) {
    unit ? run_direct<T, VB, 8, 2, true>(c, x, index, scale, rows, bias, out)
         : run_direct<T, VB, 8, 2, false>(c, x, index, scale, rows, bias, out);
  } else if (c.out_w >= 16) {
    unit ? run_direct<T, VB, 16, 1, true>(c, x, index, scale, rows, bias, out)
         : run_direct<T, VB, 16, 1, false>(c, x, index, scale, rows, bias, out);
  } else if (c.out_w >= 8) {
    unit ? run_direct<T, VB, 8, 1, true>(c, x, index, scale, rows, bias, out)
         : run_direct<T, VB, 8, 1, false>(c, x, index, scale, rows, bias, out);
  } else if (c.out_w >= 4 && vectors == 1) {
    unit ? run_direct<T, VB, 4, 1, true>(c, x, index, scale, rows, bias, out)
         : run_direct<T, VB, 4, 1, false>(c, x, index, scale, rows, bias, out);
  } else if (c.out_w >= 4 && vectors == 2) {
    unit ? run_direct<T, VB, 4, 2, true>(c, x, index, scale, rows, bias, out)
         : run_direct<T, VB, 4, 2, false>(c, x, index, scale, rows, bias, out);
  } else if (c.out_w >= 4 && vectors == 3) {
    unit ? run_direct<T, VB, 4, 3, true>(c, x, index, scale, rows, bias, out)
         : run_direct<T, VB, 4, 3, false>(c, x, index, scale, rows, bias, out);
  } else if (positions <= 64 && vectors % 4 == 0) {
    run_all<T, VB, 6, 4>(c, x, index, scale, rows, bias, out);
  } else if (positions <= 64 && vectors % 3 == 0) {
    run_all<T, VB, 8, 3>(c, x, index, scale, rows, bias, out);
  } else if (positions <= 64 && vectors % 2 == 0) {
    run_all<T, VB, 12, 2>(c, x, index, scale, rows, bias, out);
  } else if (positions <= 16) {
    run_all<T, VB, 16, 1>(c, x, index, scale, rows, bias, out);
  } else {
    run_all<T, VB, 24, 1>(c, x, index, scale, rows, bias, out);
  }
  return 0;
}

// 64-byte vectors where a head's padded outputs fill them, else 32-byte ones (heads of at most
// 8 float32 or 4 float64 outputs: a 64-byte vector would compute half zeros).
template <typename T>
int run(const Conv& c, const T* x, const int64_t* index, const T* scale, const T* rows,
        const T* bias, T* out) {
  if (c.o_pad % Vec<T, 64>::lanes == 0) return run_width<T, 64>(c, x, index, scale, rows, bias, out);
  return run_width<T, 32>(c, x, index, scale, rows, bias, out);
}

// The selection of functional.select_kept from the saliencies g (strided like scale): per
// example and head the `keep` largest (NaN above everything, as torch.topk) and their scales, 0
// for those not above the (keep+1)-th largest (the reference's tie rule), listed in channel
// order (the kept rows are then read in memory order). Which of several channels tied at the
// threshold are listed does not matter: each has scale 0. Every channel when keep == cin.
template <typename T>
void select_kept(const Conv& c, const T* g, int64_t* index, T* scale) {
  std::vector<int64_t> order(static_cast<size_t>(c.cin));
  std::vector<char> kept(static_cast<size_t>(c.cin));
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t i = 0; i < c.heads; ++i) {
      const T* v = g + b * c.scale_sb + i * c.scale_sh;
      int64_t* idx = index + (b * c.heads + i) * c.keep;
      T* sc = scale + (b * c.heads + i) * c.keep;
      if (c.keep == c.cin) {
        for (int64_t k = 0; k < c.cin; ++k) {
          idx[k] = k;
          sc[k] = v[k];
        }
        continue;
      }
      for (int64_t k = 0; k < c.cin; ++k) order[k] = k;
      const auto above = [v](int64_t a, int64_t b) {
        if (std::isnan(v[a])) return !std::isnan(v[b]);
        if (std::isnan(v[b])) return false;
        return v[a] > v[b];
      };
      // order[keep] is the (keep+1)-th largest, the ones before it the keep largest
      std::nth_element(order.begin(), order.begin() + c.keep, order.end(), above);
      const T threshold = v[order[c.keep]];
      std::fill(kept.begin(), kept.end(), 0);
      for (int64_t k = 0; k < c.keep; ++k) kept[order[k]] = 1;
      for (int64_t channel = 0, k = 0; channel < c.cin; ++channel) {
        if (!kept[channel]) continue;
        idx[k] = channel;
        sc[k++] = v[channel] <= threshold ? T(0) : v[channel];
      }
    }
  }
}

template <typename T>
int select_and_run(Conv c, const T* x, const T* g, const T* rows, const T* bias, T* out) {
  thread_local std::vector<int64_t> index;
  thread_local std::vector<T> scale;
  index.resize(static_cast<size_t>(c.batch * c.heads * c.keep));
  scale.resize(index.size());
  select_kept(c, g, index.data(), scale.data());
  c.index_sh = c.scale_sh = c.keep;
  c.index_sb = c.scale_sb = c.heads * c.keep;
  return run(c, x, index.data(), scale.data(), rows, bias, out);
}

Conv unpack(const int64_t* s) {
  return Conv{s[0],  s[1],  s[2],  s[3],  s[4],  s[5],  s[6],  s[7],  s[8],  s[9],  s[10],
              s[11], s[12], s[13], s[14], s[15], s[16], s[17], s[18], s[19], s[20], s[21]};
}

}  // namespace

// shape: batch, cin, height, width, heads, keep, cout/h, Opad, kh, kw, sh, sw, ph, pw, dh, dw,
// out_h, out_w, then the strides of index and scale (or g) over examples and heads.
// 0: done; 1: Opad not a whole number of vectors; 3: out of memory. Built once per dtype:
// DGC_FLOAT32 or DGC_FLOAT64 defined (dynaconv.native's defines), its two entry points only.
extern "C" {

#ifdef DGC_FLOAT32
int dgc_gathered_conv_f32(const float* x, const int64_t* index, const float* scale,
                          const float* rows, const float* bias, float* out, const int64_t* shape) {
  try {
    return run<float>(unpack(shape), x, index, scale, rows, bias, out);
  } catch (...) {  // std::bad_alloc of the buffers
    return 3;
  }
}

int dgc_select_conv_f32(const float* x, const float* g, const float* rows, const float* bias,
                        float* out, const int64_t* shape) {
  try {
    return select_and_run<float>(unpack(shape), x, g, rows, bias, out);
  } catch (...) {
    return 3;
  }
}
#endif

#ifdef DGC_FLOAT64
int dgc_gathered_conv_f64(const double* x, const int64_t* index, const double* scale,
                          const double* rows, const double* bias, double* out,
                          const int64_t* shape) {
  try {
    return run<double>(unpack(shape), x, index, scale, rows, bias, out);
  } catch (...) {
    return 3;
  }
}

int dgc_select_conv_f64(const double* x, const double* g, const double* rows, const double* bias,
                        double* out, const int64_t* shape) {
  try {
    return select_and_run<double>(unpack(shape), x, g, rows, bias, out);
  } catch (...) {
    return 3;
  }
}
#endif
}
