// Weight kinds: how a weight row is stored. The Python side uses the same enum, exported by
// bindings.cpp as the extension's `Kind`.
//   BF16, FP16, FP32: the values as stored.
//   INT8: codes q (0..255) per row, w = q * scale + shift (shift = -zero * scale).
//   INT4: codes q (0..15, high nibble first) per group, w = lo + scale * q; per-row int4 is the
//         case of one group per row.
#pragma once

namespace flm {

enum Kind : int { BF16 = 0, FP16 = 1, INT8 = 2, INT4 = 3, FP32 = 4 };

}  // namespace flm
