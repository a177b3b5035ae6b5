// Fused CPU kernels of Partial FC's memory-bound passes (see partialfc/cpu_kernels.py).
//
// Each kernel does in one sweep over its rows what the torch-op version does in several
// whole-tensor passes; a row (D or S elements) stays in cache between the steps of a sweep.
// The torch-op versions in partialfc/fused.py and partialfc/optim.py remain the reference
// (and the path on every other device); tests compare the two.
//
// Preconditions (checked here; partialfc.cpu_kernels.usable routes everything else to the
// torch ops): CPU, contiguous, one floating dtype (float32 or float64), int64 row indices
// within range. sgd_rows_ also needs indices without duplicates (rows are updated in
// parallel); ShardOptimizer coalesces its sparse gradients first.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

// Rows per parallel_for grain: enough work per task to amortise the scheduling.
constexpr int64_t kGrain = 64;
// Elements per partial sum of a softmax row (summed in the row's dtype, then in double).
constexpr int64_t kSumBlock = 1024;
// The same for the transposed layout, where a partial sum is one sequential chain per row
// (a row's sweep splits its block over the vector lanes, 16 chains of 64 for float).
constexpr int64_t kColSumBlock = 64;

// The float row loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked when the
// library loads (GCC function multiversioning); one portable version elsewhere.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define PFC_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PFC_MULTIVERSION
#endif

// exp(x) for float without a function call per element, so that the row loops vectorise:
// Cephes' expf reduction x = n ln2 + r (|r| <= ln2 / 2) and degree-5 polynomial, 2^n built
// in the exponent bits. Within 2 ulp of expf for -87.3 <= x <= 88.37; below -87.3 (-inf
// included) it returns 0 where expf gives a denormal or 0; above 88.37 it saturates at
// exp(88.37) (the softmax only takes x <= 0); NaN propagates.
inline float exp_f32(float x) {
  const float lo = -87.33654f;
  const float xc = std::max(std::min(x, 88.37f), lo);
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick; t's low mantissa bits
  // then hold n, read back as an integer to build 2^n.
  const float shifter = 12582912.0f;
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ni = std::bit_cast<int32_t>(t) - 0x4B400000;
  const float y = p * std::bit_cast<float>((ni + 127) << 23);
  const float out = x < lo ? 0.0f : y;
  return x != x ? x : out;
}

inline float exp_any(float x) { return exp_f32(x); }
inline double exp_any(double x) { return std::exp(x); }

// ----------------------------------------------------------------------------- row loops

template <typename T>
inline void sgd_row_t(T* w, T* m, const T* g, int64_t d, T lr, T mu, T wd) {
  if (m != nullptr) {
    // torch.optim.SGD (dampening 0): buf = mu * buf + (g + wd * w); w -= lr * buf.
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) {
      const T buf = g[k] + mu * m[k] + wd * w[k];
      m[k] = buf;
      w[k] -= lr * buf;
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) w[k] -= lr * (g[k] + wd * w[k]);
  }
}

template <typename T>
inline void project_row_t(T* g, const T* w, int64_t d, T coef) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t k = 0; k < d; ++k) dot += g[k] * w[k];
  const T a = dot * coef;
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) g[k] -= a * w[k];
}

template <typename T>
inline T copy_row_sumsq_t(T* out, const T* w, int64_t d) {
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t k = 0; k < d; ++k) {
    out[k] = w[k];
    sq += w[k] * w[k];
  }
  return sq;
}

template <typename T>
inline T row_max_t(const T* row, int64_t s, T m) {
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < s; ++j) m = row[j] > m ? row[j] : m;
  return m;
}

// row *= col elementwise, then the row's maximum (with m as the starting value).
template <typename T>
inline T scale_row_max_t(T* row, const T* col, int64_t s, T m) {
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < s; ++j) {
    const T v = row[j] * col[j];
    row[j] = v;
    m = v > m ? v : m;
  }
  return m;
}

// row = exp(row - shift), times col elementwise when col is given; returns the sum of the
// exponentials (before the column factor).
template <typename T>
inline double row_exp_sum_t(T* row, const T* col, int64_t s, T shift) {
  // Vectorised partial sums over blocks, added up in double.
  double total = 0;
  for (int64_t j0 = 0; j0 < s; j0 += kSumBlock) {
    const int64_t j1 = std::min(s, j0 + kSumBlock);
    T acc = 0;
    if (col == nullptr) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = j0; j < j1; ++j) {
        const T e = exp_any(row[j] - shift);
        row[j] = e;
        acc += e;
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = j0; j < j1; ++j) {
        const T e = exp_any(row[j] - shift);
        row[j] = e * col[j];
        acc += e;
      }
    }
    total += static_cast<double>(acc);
  }
  return total;
}

// The transposed layout (zt [S, N], column j of the logits is row j of zt): one row of zt
// updates N per-row running values. seg *= c, then m = max(m, seg) elementwise.
template <typename T>
inline void seg_scale_max_t(T* seg, T c, T* m, int64_t w) {
#pragma omp simd
  for (int64_t i = 0; i < w; ++i) {
    const T v = seg[i] * c;
    seg[i] = v;
    m[i] = v > m[i] ? v : m[i];
  }
}

// seg = exp(seg - shift) * c elementwise, acc += exp(seg - shift).
template <typename T>
inline void seg_exp_acc_t(T* seg, const T* shift, T* acc, int64_t w, T c) {
#pragma omp simd
  for (int64_t i = 0; i < w; ++i) {
    const T e = exp_any(seg[i] - shift[i]);
    seg[i] = e * c;
    acc[i] += e;
  }
}

// Float versions compiled per instruction set; double versions plain.
PFC_MULTIVERSION void sgd_row(float* w, float* m, const float* g, int64_t d, float lr, float mu,
                              float wd) {
  sgd_row_t(w, m, g, d, lr, mu, wd);
}
void sgd_row(double* w, double* m, const double* g, int64_t d, double lr, double mu, double wd) {
  sgd_row_t(w, m, g, d, lr, mu, wd);
}
PFC_MULTIVERSION void project_row(float* g, const float* w, int64_t d, float coef) {
  project_row_t(g, w, d, coef);
}
void project_row(double* g, const double* w, int64_t d, double coef) {
  project_row_t(g, w, d, coef);
}
PFC_MULTIVERSION float copy_row_sumsq(float* out, const float* w, int64_t d) {
  return copy_row_sumsq_t(out, w, d);
}
double copy_row_sumsq(double* out, const double* w, int64_t d) {
  return copy_row_sumsq_t(out, w, d);
}
PFC_MULTIVERSION float row_max(const float* row, int64_t s, float m) {
  return row_max_t(row, s, m);
}
double row_max(const double* row, int64_t s, double m) { return row_max_t(row, s, m); }
PFC_MULTIVERSION float scale_row_max(float* row, const float* col, int64_t s, float m) {
  return scale_row_max_t(row, col, s, m);
}
double scale_row_max(double* row, const double* col, int64_t s, double m) {
  return scale_row_max_t(row, col, s, m);
}
PFC_MULTIVERSION double row_exp_sum(float* row, const float* col, int64_t s, float shift) {
  return row_exp_sum_t(row, col, s, shift);
}
double row_exp_sum(double* row, const double* col, int64_t s, double shift) {
  return row_exp_sum_t(row, col, s, shift);
}

PFC_MULTIVERSION void seg_scale_max(float* seg, float c, float* m, int64_t w) {
  seg_scale_max_t(seg, c, m, w);
}
void seg_scale_max(double* seg, double c, double* m, int64_t w) { seg_scale_max_t(seg, c, m, w); }
PFC_MULTIVERSION void seg_exp_acc(float* seg, const float* shift, float* acc, int64_t w, float c) {
  seg_exp_acc_t(seg, shift, acc, w, c);
}
void seg_exp_acc(double* seg, const double* shift, double* acc, int64_t w, double c) {
  seg_exp_acc_t(seg, shift, acc, w, c);
}

// ------------------------------------------------------------------------- tensor kernels

template <typename T>
void sgd_rows_impl(at::Tensor& param, at::Tensor& momentum, const at::Tensor& index,
                   const at::Tensor& grad, double lr, double mu, double wd) {
  const int64_t d = param.size(1);
  T* w_base = param.data_ptr<T>();
  T* m_base = momentum.defined() ? momentum.data_ptr<T>() : nullptr;
  const T* g_base = grad.data_ptr<T>();
  const int64_t* idx = index.data_ptr<int64_t>();
  at::parallel_for(0, index.size(0), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      sgd_row(w_base + idx[i] * d, m_base == nullptr ? nullptr : m_base + idx[i] * d,
              g_base + i * d, d, static_cast<T>(lr), static_cast<T>(mu), static_cast<T>(wd));
    }
  });
}

template <typename T>
void project_radial_impl(at::Tensor& grad, const at::Tensor& rows, const at::Tensor& coef) {
  const int64_t d = grad.size(1);
  T* g_base = grad.data_ptr<T>();
  const T* w_base = rows.data_ptr<T>();
  const T* c = coef.data_ptr<T>();
  at::parallel_for(0, grad.size(0), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) project_row(g_base + i * d, w_base + i * d, d, c[i]);
  });
}

template <typename T>
void project_radial_rows_impl(at::Tensor& grad, const at::Tensor& weight, const at::Tensor& index,
                              const at::Tensor& coef) {
  const int64_t d = grad.size(1);
  T* g_base = grad.data_ptr<T>();
  const T* w_base = weight.data_ptr<T>();
  const int64_t* idx = index.data_ptr<int64_t>();
  const T* c = coef.data_ptr<T>();
  at::parallel_for(0, grad.size(0), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      project_row(g_base + i * d, w_base + idx[i] * d, d, c[i]);
    }
  });
}

template <typename T>
void gather_rows_inv_norm_impl(const at::Tensor& weight, const at::Tensor& index, at::Tensor& out,
                               at::Tensor& inv, double eps) {
  const int64_t d = weight.size(1);
  const T* w_base = weight.data_ptr<T>();
  const int64_t* idx = index.data_ptr<int64_t>();
  T* o_base = out.data_ptr<T>();
  T* inv_p = inv.data_ptr<T>();
  at::parallel_for(0, index.size(0), kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T sq = copy_row_sumsq(o_base + i * d, w_base + idx[i] * d, d);
      inv_p[i] = T(1) / std::max(std::sqrt(sq), static_cast<T>(eps));
    }
  });
}

template <typename T>
void softmax_rows_impl(at::Tensor& z, const at::Tensor& col_scale, at::Tensor& max_out,
                       at::Tensor& sum_out) {
  const int64_t s = z.size(1);
  T* z_base = z.data_ptr<T>();
  const T* col = col_scale.defined() ? col_scale.data_ptr<T>() : nullptr;
  T* mx = max_out.data_ptr<T>();
  T* sm = sum_out.data_ptr<T>();
  at::parallel_for(0, z.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = z_base + i * s;
      const T m = col == nullptr ? row_max(row, s, mx[i]) : scale_row_max(row, col, s, mx[i]);
      mx[i] = m;
      // A row with no finite value (every column masked, no target) is all zeros after exp.
      sm[i] = static_cast<T>(row_exp_sum(row, col, s, std::isfinite(m) ? m : T(0)));
    }
  });
}

// softmax_rows_impl for the logits stored transposed (zt [S, N]): two sweeps over zt (the
// row maxima need every column first). Threads split the S rows of zt into tiles; each tile
// keeps its own N maxima / sums, combined after each sweep.
template <typename T>
void softmax_cols_impl(at::Tensor& zt, const at::Tensor& col_scale, at::Tensor& max_out,
                       at::Tensor& sum_out) {
  const int64_t s = zt.size(0);
  const int64_t n = zt.size(1);
  T* z_base = zt.data_ptr<T>();
  const T* col = col_scale.defined() ? col_scale.data_ptr<T>() : nullptr;
  T* mx = max_out.data_ptr<T>();
  T* sm = sum_out.data_ptr<T>();
  const int64_t tiles =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (s + kGrain - 1) / kGrain));
  const int64_t tile_rows = (s + tiles - 1) / tiles;
  std::vector<T> tile_max(tiles * n, -std::numeric_limits<T>::infinity());
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* m = tile_max.data() + t * n;
      for (int64_t j = t * tile_rows; j < std::min(s, (t + 1) * tile_rows); ++j) {
        seg_scale_max(z_base + j * n, col == nullptr ? T(1) : col[j], m, n);
      }
    }
  });
  // A row with no finite value (every column masked, no target) is all zeros after exp.
  std::vector<T> shift(n);
  for (int64_t i = 0; i < n; ++i) {
    T m = mx[i];
    for (int64_t t = 0; t < tiles; ++t) m = tile_max[t * n + i] > m ? tile_max[t * n + i] : m;
    mx[i] = m;
    shift[i] = std::isfinite(m) ? m : T(0);
  }
  std::vector<double> tile_sum(tiles * n, 0.0);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> acc(n);
    for (int64_t t = t0; t < t1; ++t) {
      double* total = tile_sum.data() + t * n;
      const int64_t end = std::min(s, (t + 1) * tile_rows);
      // Partial sums over blocks of columns in the dtype, added up in double.
      for (int64_t j0 = t * tile_rows; j0 < end; j0 += kColSumBlock) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t j = j0; j < std::min(end, j0 + kColSumBlock); ++j) {
          seg_exp_acc(z_base + j * n, shift.data(), acc.data(), n, col == nullptr ? T(1) : col[j]);
        }
        for (int64_t i = 0; i < n; ++i) total[i] += static_cast<double>(acc[i]);
      }
    }
  });
  for (int64_t i = 0; i < n; ++i) {
    double total = 0.0;
    for (int64_t t = 0; t < tiles; ++t) total += tile_sum[t * n + i];
    sm[i] = static_cast<T>(total);
  }
}

// Every index within [0, rows): a bad one would write outside the tensor.
void check_index(const at::Tensor& index, int64_t rows, const char* what) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong &&
                  index.is_contiguous() && index.dim() == 1,
              what, ": index must be a contiguous 1-D int64 CPU tensor");
  if (index.numel() == 0) return;
  const int64_t* idx = index.data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(idx, idx + index.numel());
  TORCH_CHECK(*lo >= 0 && *hi < rows, what, ": index out of range [0, ", rows, "): ", *lo,
              " .. ", *hi);
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), what, ": contiguous tensors only");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": dtypes differ");
}

}  // namespace

void sgd_rows_(at::Tensor param, std::optional<at::Tensor> momentum_opt, at::Tensor index,
               at::Tensor grad, double lr, double mu, double wd) {
  at::Tensor momentum = momentum_opt.has_value() ? *momentum_opt : at::Tensor();
  check_pair(param, grad, "sgd_rows_");
  if (momentum.defined()) {
    check_pair(param, momentum, "sgd_rows_");
    TORCH_CHECK(momentum.sizes() == param.sizes(), "sgd_rows_: momentum shape");
  }
  TORCH_CHECK(param.dim() == 2, "sgd_rows_: param must be [rows, D]");
  check_index(index, param.size(0), "sgd_rows_");
  TORCH_CHECK(grad.size(0) == index.size(0) && grad.size(1) == param.size(1),
              "sgd_rows_: grad must be [len(index), D]");
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_rows_", [&] {
    sgd_rows_impl<scalar_t>(param, momentum, index, grad, lr, mu, wd);
  });
}

void project_radial_(at::Tensor grad, at::Tensor rows, at::Tensor coef) {
  check_pair(grad, rows, "project_radial_");
  check_pair(grad, coef, "project_radial_");
  TORCH_CHECK(grad.sizes() == rows.sizes() && coef.size(0) == grad.size(0),
              "project_radial_: shapes");
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "project_radial_",
                             [&] { project_radial_impl<scalar_t>(grad, rows, coef); });
}

void project_radial_rows_(at::Tensor grad, at::Tensor weight, at::Tensor index, at::Tensor coef) {
  check_pair(grad, weight, "project_radial_rows_");
  check_pair(grad, coef, "project_radial_rows_");
  TORCH_CHECK(weight.dim() == 2 && grad.dim() == 2 && grad.size(1) == weight.size(1) &&
                  index.size(0) == grad.size(0) && coef.size(0) == grad.size(0),
              "project_radial_rows_: shapes");
  check_index(index, weight.size(0), "project_radial_rows_");
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "project_radial_rows_", [&] {
    project_radial_rows_impl<scalar_t>(grad, weight, index, coef);
  });
}

void gather_rows_inv_norm(at::Tensor weight, at::Tensor index, at::Tensor out, at::Tensor inv,
                          double eps) {
  check_pair(weight, out, "gather_rows_inv_norm");
  check_pair(weight, inv, "gather_rows_inv_norm");
  TORCH_CHECK(weight.dim() == 2, "gather_rows_inv_norm: weight must be [rows, D]");
  check_index(index, weight.size(0), "gather_rows_inv_norm");
  TORCH_CHECK(out.size(0) == index.size(0) && out.size(1) == weight.size(1) &&
                  inv.size(0) == index.size(0),
              "gather_rows_inv_norm: shapes");
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "gather_rows_inv_norm", [&] {
    gather_rows_inv_norm_impl<scalar_t>(weight, index, out, inv, eps);
  });
}

namespace {

// The checks shared by softmax_rows_ and softmax_cols_: the logits have `rows` logit rows
// (row_max, row_sum) and `cols` columns (col_scale) along dimensions `row_dim` / 1 - row_dim.
at::Tensor check_softmax_args(const at::Tensor& z, const std::optional<at::Tensor>& col_scale_opt,
                              const at::Tensor& row_max, const at::Tensor& row_sum,
                              int64_t row_dim, const char* what) {
  at::Tensor col_scale = col_scale_opt.has_value() ? *col_scale_opt : at::Tensor();
  check_pair(z, row_max, what);
  check_pair(z, row_sum, what);
  TORCH_CHECK(z.dim() == 2, what, ": logits must be 2-D");
  if (col_scale.defined()) {
    check_pair(z, col_scale, what);
    TORCH_CHECK(col_scale.size(0) == z.size(1 - row_dim), what, ": col_scale must be [S]");
  }
  TORCH_CHECK(row_max.size(0) == z.size(row_dim) && row_sum.size(0) == z.size(row_dim), what,
              ": shapes");
  return col_scale;
}

}  // namespace

void softmax_rows_(at::Tensor z, std::optional<at::Tensor> col_scale_opt, at::Tensor row_max,
                   at::Tensor row_sum) {
  at::Tensor col_scale = check_softmax_args(z, col_scale_opt, row_max, row_sum, 0, "softmax_rows_");
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "softmax_rows_", [&] {
    softmax_rows_impl<scalar_t>(z, col_scale, row_max, row_sum);
  });
}

void softmax_cols_(at::Tensor zt, std::optional<at::Tensor> col_scale_opt, at::Tensor row_max,
                   at::Tensor row_sum) {
  at::Tensor col_scale =
      check_softmax_args(zt, col_scale_opt, row_max, row_sum, 1, "softmax_cols_");
  AT_DISPATCH_FLOATING_TYPES(zt.scalar_type(), "softmax_cols_", [&] {
    softmax_cols_impl<scalar_t>(zt, col_scale, row_max, row_sum);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgd_rows_", &sgd_rows_, "SGD (momentum, coupled weight decay) on the indexed rows");
  m.def("project_radial_", &project_radial_, "grad_i -= coef_i * (grad_i . w_i) * w_i");
  m.def("project_radial_rows_", &project_radial_rows_,
        "grad_i -= coef_i * (grad_i . w_k) * w_k with w_k = weight[index_i]");
  m.def("gather_rows_inv_norm", &gather_rows_inv_norm, "out = weight[index], inv = 1/|row|");
  m.def("softmax_rows_", &softmax_rows_,
        "per row: u = z * col_scale (optional), m = max(m, max u), z = exp(u - m) * col_scale; "
        "the max and the sum of exp(u - m)");
  m.def("softmax_cols_", &softmax_cols_,
        "softmax_rows_ of the logits stored transposed: zt [S, N] holds z.T");
}
