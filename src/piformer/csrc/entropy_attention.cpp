// Causal softmax attention that also returns each query row's entropy, forward and backward,
// on the CPU at head width D: the pass that exponentiates a tile of logits also sums p s, the
// entropy's expected logit, so the forward does SDPA's two products and nothing at width 2D.
//
// Per (batch, head), query rows are taken in blocks of BQ; a block of rows [i0, i1) meets keys
// [0, i1) only (causal), so its working memory is BQ x T and no (T, T) tensor exists anywhere.
// Matrix products go to the BLAS PyTorch links (MKL's sgemm_/dgemm_), one thread per task.
// Exponentials use ATen's exp_u20 (within 20 ulp in float32, exact exp in float64), as PyTorch's
// own CPU flash attention does: measured faster than the 1-ulp exp, and inside the 1e-5 the
// tests hold both kernels to.
//
//   forward:  S = scale Q K^T, P = softmax(S), y = P V,
//             es_i = sum_j p_ij s_ij (= E_p[s_i], summed in the softmax pass), ent_i = max(lse_i - es_i, 0)
//   backward: dS = P o (dY V^T - dent_i s_ij - c_i), c_i = dy_i . y_i - dent_i es_i,
//             dQ = scale dS K, dK = scale dS^T Q, dV = P^T dY
// (the entropy's part of dS is -dent_i p_ij (s_ij - es_i); see attention.py for the derivation).
//
// Built at first use by torch.utils.cpp_extension (attention.py), for the machine it runs on.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cmath>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
// MKL's per-thread limit; absent (weak, null) when torch links another BLAS.
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

namespace {

using at::vec::Vectorized;

// Row-major C (m x n) = alpha op(A) op(B) + beta C, op(A) m x k, op(B) k x n, through the
// column-major BLAS: C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int M = n, N = m, K = k, LA = ldb, LB = lda, LC = ldc;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&tB, &tA, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
  } else {
    dgemm_(&tB, &tA, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
  }
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// A (B, H, T, D) tensor with a unit last stride, addressed per (b, h) and row.
template <typename T>
struct Heads {
  T* data;
  int64_t sb, sh, st;
  Heads(const at::Tensor& x) : data(x.data_ptr<T>()), sb(x.stride(0)), sh(x.stride(1)), st(x.stride(2)) {}
  T* at(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

struct ThreadLocalBlas {
  int previous = 0;
  ThreadLocalBlas() { if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1); }
  ~ThreadLocalBlas() { if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous); }
};

template <typename T>
void forward_kernel(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, double scale_d,
                    int64_t block, at::Tensor& y_, at::Tensor& lse_, at::Tensor& es_, at::Tensor& ent_) {
  using Vec = Vectorized<T>;
  const int64_t B = q_.size(0), H = q_.size(1), Tn = q_.size(2), D = q_.size(3);
  const T scale = static_cast<T>(scale_d);
  Heads<T> q(q_), k(k_), v(v_), y(y_);
  T* lse = lse_.data_ptr<T>();
  T* es = es_.data_ptr<T>();
  T* ent = ent_.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    ThreadLocalBlas one_thread;
    std::vector<T> S(block * Tn), inv(block);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T *Q = q.at(b, h), *K = k.at(b, h), *V = v.at(b, h);
      T* Y = y.at(b, h);
      for (int64_t i0 = 0; i0 < Tn; i0 += block) {
        const int64_t bq = std::min(block, Tn - i0), nk = i0 + bq;
        gemm<T>(false, true, bq, nk, D, scale, Q + i0 * q.st, q.st, K, k.st, T(0), S.data(), nk);
        for (int64_t r = 0; r < bq; ++r) {
          T* s = S.data() + r * nk;
          const int64_t n = i0 + r + 1;  // keys 0..i
          const T m = at::vec::reduce_all<T>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, s, n);
          // One pass: unnormalised p = exp(s - m), its sum l, and sum_j p_ij s_ij, so that
          // E_p[s_i] (the entropy's second term) needs no P K product.
          const Vec vm(m);
          Vec acc(0), acc_ps(0);
          int64_t j = 0;
          for (; j + Vec::size() <= n; j += Vec::size()) {
            const Vec x = Vec::loadu(s + j), p = (x - vm).exp_u20();
            p.store(s + j);
            acc = acc + p;
            acc_ps = at::vec::fmadd(p, x, acc_ps);
          }
          if (j < n) {
            const int64_t rest = n - j;
            const Vec x = Vec::loadu(s + j, rest), p = (x - vm).exp_u20();
            p.store(s + j, rest);
            acc = acc + Vec::set(Vec(0), p, rest);
            acc_ps = acc_ps + Vec::set(Vec(0), p * x, rest);
          }
          const auto add = [](Vec a, Vec b) { return a + b; };
          const T l = at::vec::vec_reduce_all<T>(add, acc);
          inv[r] = T(1) / l;
          std::fill(s + n, s + nk, T(0));
          const int64_t i = bh * Tn + i0 + r;
          lse[i] = m + std::log(l);
          es[i] = at::vec::vec_reduce_all<T>(add, acc_ps) * inv[r];
          // A difference of two terms as large as the logits: when attention has collapsed the
          // rounding can leave it a little below 0; an entropy is >= 0.
          ent[i] = std::max(lse[i] - es[i], T(0));
        }
        // y = P V / l: the 1/l scales the D-wide rows rather than the n-wide ones of P.
        gemm<T>(false, false, bq, D, nk, T(1), S.data(), nk, V, v.st, T(0), Y + i0 * y.st, y.st);
        for (int64_t r = 0; r < bq; ++r) {
          T* yr = Y + (i0 + r) * y.st;
          for (int64_t c = 0; c < D; ++c) yr[c] *= inv[r];
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const at::Tensor& dy_, const at::Tensor& dent_, const at::Tensor& q_, const at::Tensor& k_,
                     const at::Tensor& v_, const at::Tensor& y_, const at::Tensor& lse_, const at::Tensor& es_,
                     double scale_d, int64_t block, at::Tensor& dq_, at::Tensor& dk_, at::Tensor& dv_) {
  using Vec = Vectorized<T>;
  const int64_t B = q_.size(0), H = q_.size(1), Tn = q_.size(2), D = q_.size(3);
  const T scale = static_cast<T>(scale_d);
  Heads<T> dy(dy_), q(q_), k(k_), v(v_), y(y_), dq(dq_), dk(dk_), dv(dv_);
  const T* lse = lse_.data_ptr<T>();
  const T* es = es_.data_ptr<T>();
  const T* dent = dent_.data_ptr<T>();  // (B, H, T) contiguous
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    ThreadLocalBlas one_thread;
    std::vector<T> S(block * Tn), dP(block * Tn);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T *Q = q.at(b, h), *K = k.at(b, h), *V = v.at(b, h), *Y = y.at(b, h), *dY = dy.at(b, h);
      T *dQ = dq.at(b, h), *dK = dk.at(b, h), *dV = dv.at(b, h);
      for (int64_t t = 0; t < Tn; ++t) {
        std::fill(dK + t * dk.st, dK + t * dk.st + D, T(0));
        std::fill(dV + t * dv.st, dV + t * dv.st + D, T(0));
      }
      for (int64_t i0 = 0; i0 < Tn; i0 += block) {
        const int64_t bq = std::min(block, Tn - i0), nk = i0 + bq;
        gemm<T>(false, true, bq, nk, D, scale, Q + i0 * q.st, q.st, K, k.st, T(0), S.data(), nk);
        gemm<T>(false, true, bq, nk, D, T(1), dY + i0 * dy.st, dy.st, V, v.st, T(0), dP.data(), nk);
        for (int64_t r = 0; r < bq; ++r) {
          const int64_t i = i0 + r, n = i + 1, row = bh * Tn + i;
          const T de = dent[row];
          const T c = dot(dY + i * dy.st, Y + i * y.st, D) - de * es[row];
          const Vec vl(lse[row]), vde(de), vc(c);
          T *s = S.data() + r * nk, *dp = dP.data() + r * nk;
          int64_t j = 0;
          for (; j + Vec::size() <= n; j += Vec::size()) {
            const Vec x = Vec::loadu(s + j), p = (x - vl).exp_u20();
            p.store(s + j);
            (p * (Vec::loadu(dp + j) - vde * x - vc)).store(dp + j);
          }
          if (j < n) {
            const int64_t rest = n - j;
            const Vec x = Vec::loadu(s + j, rest), p = (x - vl).exp_u20();
            p.store(s + j, rest);
            (p * (Vec::loadu(dp + j, rest) - vde * x - vc)).store(dp + j, rest);
          }
          std::fill(s + n, s + nk, T(0));
          std::fill(dp + n, dp + nk, T(0));
        }
        gemm<T>(true, false, nk, D, bq, T(1), S.data(), nk, dY + i0 * dy.st, dy.st, T(1), dV, dv.st);
        gemm<T>(false, false, bq, D, nk, scale, dP.data(), nk, K, k.st, T(0), dQ + i0 * dq.st, dq.st);
        gemm<T>(true, false, nk, D, bq, scale, dP.data(), nk, Q + i0 * q.st, q.st, T(1), dK, dk.st);
      }
    }
  });
}

void check_heads(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(x.dim() == 4 && x.sizes() == like.sizes(), name, " must be (B, H, T, D) like q, got ", x.sizes());
  TORCH_CHECK(x.stride(3) == 1, name, " must have a unit last stride");
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), name, " must have q's dtype");
}

std::vector<at::Tensor> forward(at::Tensor q, at::Tensor k, at::Tensor v, double scale, int64_t block) {
  check_heads(q, "q", q);
  check_heads(k, "k", q);
  check_heads(v, "v", q);
  const auto B = q.size(0), H = q.size(1), T = q.size(2);
  auto y = at::empty_like(q, at::MemoryFormat::Contiguous);
  auto lse = at::empty({B, H, T}, q.options()), es = at::empty({B, H, T}, q.options());
  auto ent = at::empty({B, H, T}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "entropy_attention_forward",
                             [&] { forward_kernel<scalar_t>(q, k, v, scale, block, y, lse, es, ent); });
  return {y, ent, lse, es};
}

void backward(at::Tensor dy, at::Tensor dent, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor y,
              at::Tensor lse, at::Tensor es, double scale, int64_t block, at::Tensor dq, at::Tensor dk,
              at::Tensor dv) {
  for (auto [x, name] : {std::pair{&dy, "dy"}, {&q, "q"}, {&k, "k"}, {&v, "v"}, {&y, "y"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}})
    check_heads(*x, name, q);
  TORCH_CHECK(dent.is_contiguous() && lse.is_contiguous() && es.is_contiguous(), "row tensors must be contiguous");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "entropy_attention_backward", [&] {
    backward_kernel<scalar_t>(dy, dent, q, k, v, y, lse, es, scale, block, dq, dk, dv);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "causal attention with row entropies: y, ent, lse, es");
  m.def("backward", &backward, "gradients of (y, ent) into dq, dk, dv (written in place)");
}
