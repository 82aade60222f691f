// emu_elementwise.h: CuPy's CArray, CIndexer and float16 for ElementwiseKernel loops.
//
// The loader generates a plain loop over the elements (no threads, no fibers) around the
// operation; arrays are these CuPy-compatible views with bounds-checked indexing.
#pragma once

#include "emu.h"

namespace emu {

struct IndexError {
  char message[256];
};

[[noreturn]] inline void index_error(const char* name, const char* fmt, long long a, long long b) {
  IndexError e;
  int n = snprintf(e.message, sizeof e.message, "index out of range on raw array `%s`: ", name);
  snprintf(e.message + n, sizeof e.message - size_t(n), fmt, a, b);
  throw e;
}

template <typename T, int _ndim, bool _c_contiguous = false, bool _use_32bit_indexing = false>
class CArray {
 public:
  static const int ndim = _ndim;
  CArray() = default;
  CArray(T* data, const int64_t* shape, const int64_t* strides, const char* name) : data_(data), name_(name) {
    size_ = 1;
    for (int i = 0; i < ndim; ++i) {
      shape_[i] = shape[i];
      strides_[i] = strides[i];
      size_ *= shape[i];
    }
  }
  ptrdiff_t size() const { return size_; }
  const ptrdiff_t* shape() const { return shape_; }
  const ptrdiff_t* strides() const { return strides_; }
  T* data() const { return data_; }
  template <typename Int>
  T& operator[](const Int (&idx)[_ndim]) const {
    ptrdiff_t off = 0;
    for (int d = 0; d < ndim; ++d) {
      if (idx[d] < 0 || ptrdiff_t(idx[d]) >= shape_[d])
        index_error(name_, "index %lld, size %lld", (long long)idx[d], (long long)shape_[d]);
      off += ptrdiff_t(idx[d]) * strides_[d];
    }
    return *reinterpret_cast<T*>(reinterpret_cast<char*>(data_) + off);
  }
  T& operator[](ptrdiff_t i) const {  // flat index in C order
    if (i < 0 || i >= size_) index_error(name_, "flat index %lld, size %lld", (long long)i, (long long)size_);
    ptrdiff_t off = 0;
    for (int d = ndim - 1; d > 0; --d) {
      off += strides_[d] * (i % shape_[d]);
      i /= shape_[d];
    }
    if (ndim > 0) off += strides_[0] * i;
    return *reinterpret_cast<T*>(reinterpret_cast<char*>(data_) + off);
  }

 private:
  T* data_ = nullptr;
  const char* name_ = "";
  ptrdiff_t size_ = 0;
  ptrdiff_t shape_[_ndim > 0 ? _ndim : 1] = {};
  ptrdiff_t strides_[_ndim > 0 ? _ndim : 1] = {};
};

template <int _ndim, bool _use_32bit_indexing = false>
class CIndexer {
 public:
  static const int ndim = _ndim;
  explicit CIndexer(const int64_t* shape) {
    size_ = 1;
    for (int i = 0; i < ndim; ++i) {
      shape_[i] = shape[i];
      index_[i] = 0;
      size_ *= shape[i];
    }
  }
  ptrdiff_t size() const { return size_; }
  void set(ptrdiff_t i) {
    for (int d = ndim - 1; d > 0; --d) {
      index_[d] = i % shape_[d];
      i /= shape_[d];
    }
    if (ndim > 0) index_[0] = i;
  }
  const ptrdiff_t (&get() const)[_ndim > 0 ? _ndim : 1] { return index_; }

 private:
  ptrdiff_t size_;
  ptrdiff_t shape_[_ndim > 0 ? _ndim : 1] = {};
  ptrdiff_t index_[_ndim > 0 ? _ndim : 1] = {};
};

// CuPy's float16 element type: storage of an IEEE half, arithmetic in float.
class float16 {
 public:
  float16() = default;
  float16(float v) : bits_(from_float(v)) {}
  explicit float16(double v) : bits_(from_float(float(v))) {}
  explicit float16(bool v) : bits_(from_float(float(v))) {}
  explicit float16(int v) : bits_(from_float(float(v))) {}
  explicit float16(unsigned v) : bits_(from_float(float(v))) {}
  explicit float16(long long v) : bits_(from_float(float(v))) {}
  explicit float16(unsigned long long v) : bits_(from_float(float(v))) {}
  operator float() const { return to_float(bits_); }
  template <typename T>
  float16& operator=(const T& rhs) {
    *this = static_cast<float16>(rhs);
    return *this;
  }
  float16& operator=(const float16&) = default;
  template <typename T> float16& operator+=(const T& r) { return *this = float16(float(*this) + float(r)); }
  template <typename T> float16& operator-=(const T& r) { return *this = float16(float(*this) - float(r)); }
  template <typename T> float16& operator*=(const T& r) { return *this = float16(float(*this) * float(r)); }
  template <typename T> float16& operator/=(const T& r) { return *this = float16(float(*this) / float(r)); }
  unsigned short to_bits() const { return bits_; }
  int isnan() const { return (bits_ & 0x7C00u) == 0x7C00u && (bits_ & 0x03FFu) != 0; }
  int isinf() const { return (bits_ & 0x7FFFu) == 0x7C00u; }
  int isfinite() const { return (bits_ & 0x7C00u) != 0x7C00u; }
  int signbit() const { return (bits_ & 0x8000u) != 0; }

  // IEEE binary16 <-> binary32, round to nearest even (subnormals, infinities, NaN kept).
  static unsigned short from_float(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return uint16_t(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u | ((ax >> 13) & 0x3FFu) : 0u));
    if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to infinity
    if (ax < 0x38800000u) {  // subnormal half (or zero)
      if (ax < 0x33000000u) return uint16_t(sign);  // below half the smallest subnormal
      const uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u;
      const uint32_t shift = 126 - e;  // 14 - (e - 127) - 23 + 24 ... keeps 10 bits
      uint32_t r = m >> shift;
      const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
      if (rem > half || (rem == half && (r & 1u))) ++r;
      return uint16_t(sign | r);
    }
    uint32_t r = ((ax - 0x38000000u) >> 13);
    const uint32_t rem = ax & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  static float to_float(unsigned short h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, x;
    if (e == 0x1F) {
      x = sign | 0x7F800000u | (m << 13);
    } else if (e == 0) {
      if (m == 0) {
        x = sign;
      } else {
        e = 113;
        while (!(m & 0x400u)) { m <<= 1; --e; }
        x = sign | (e << 23) | ((m & 0x3FFu) << 13);
      }
    } else {
      x = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
  }

 private:
  unsigned short bits_;
};

inline float16 min(float16 a, float16 b) { return float16(std::fmin(float(a), float(b))); }
inline float16 max(float16 a, float16 b) { return float16(std::fmax(float(a), float(b))); }
inline float16 fmin(float16 a, float16 b) { return float16(std::fmin(float(a), float(b))); }
inline float16 fmax(float16 a, float16 b) { return float16(std::fmax(float(a), float(b))); }
inline int isnan(float16 x) { return x.isnan(); }
inline int isinf(float16 x) { return x.isinf(); }
inline int isfinite(float16 x) { return x.isfinite(); }
inline int signbit(float16 x) { return x.signbit(); }

// Runs an elementwise loop with the fault handlers installed; 0 ok, else the error is in err.
template <class F>
inline int run_elementwise(F&& loop, char* err, uint64_t errcap, double timeout_s) {
  log_buf = err;
  log_cap = errcap;
  log_len = 0;
  if (errcap) err[0] = 0;
  L = nullptr;
  int rc = OK;
  {
    SignalGuard signals(timeout_s);
    rc = sigsetjmp(abort_jmp, 1);
    if (rc == OK) {
      in_kernel = 1;
      try {
        loop();
      } catch (const IndexError& e) {
        log_append("ERROR: %s\n", e.message);
        rc = FAILED;
      }
      in_kernel = 0;
    } else {
      in_kernel = 0;
      if (rc != FAILED) describe_fault();
    }
  }
  return rc;
}

}  // namespace emu
