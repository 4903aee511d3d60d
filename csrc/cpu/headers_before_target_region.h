// What the kernels_<isa>.cpp units include before their `#pragma GCC target`
// region: every standard and shared header that the kernel headers inside the
// region include. Included first, their inline functions (which have external
// linkage) are compiled for the build's default instruction set, so no AVX2 or
// AVX-512 copy of one can replace the portable one at link time.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>

#include "attention_params.h"
#include "cpu/cpu_kernels.h"
