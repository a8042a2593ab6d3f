// The Python module: the linear kernels and the decode step.
#include "flm_kernels.h"

namespace flm {
void bind_decoder(pybind11::module &m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("linear", &flm::linear, "[x W1^T | x W2^T | ...] with each W in its storage type");
    m.def("dequantize_rows", &flm::dequantize_rows, "rows of W as float32");
    m.def("has_prefill_bf16", &flm::has_prefill_bf16, "whether prompts can multiply in bfloat16 (AVX512-BF16)");
    flm::bind_decoder(m);
}
