// The Python module: the weight kinds, the linear kernels and the decode step.
#include "flm_kernels.h"

namespace flm {
void bind_decoder(pybind11::module &m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    pybind11::enum_<flm::Kind>(m, "Kind", "how a weight row is stored (kinds.h)")
        .value("BF16", flm::BF16)
        .value("FP16", flm::FP16)
        .value("INT8", flm::INT8)
        .value("INT4", flm::INT4)
        .value("FP32", flm::FP32);
    m.def("linear", &flm::linear, "[x W1^T | x W2^T | ...] with each W in its storage type");
    m.def("dequantize_rows", &flm::dequantize_rows, "rows of W as float32");
    m.def("has_prefill_bf16", &flm::has_prefill_bf16, "whether prompts can multiply in bfloat16 (AVX512-BF16)");
    flm::bind_decoder(m);
}
