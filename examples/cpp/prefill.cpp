// One prefill of an ESPACE-compressed ONNX model with ONNX Runtime's C++ API.
//
//   prefill MODEL.onnx [--seq N] [--threads N] [--values]
//
// Every graph input is filled the way espace-export fills inputs in its own runs, for batch 1 and N
// tokens: input_ids with the fixed sequence (7·t + 3) mod 100, attention_mask with ones, position_ids
// with 0..N-1, token_type_ids and any other integer input with zeros. Prints each output's name, shape
// and first values; --values prints every value (%.9g, which reads back to the same float32), which
// tests/end_to_end/test_cpp_example.py compares with Python ONNX Runtime.
//
// The model is loaded by path, so external data (MODEL.onnx.data) is found beside it.
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string model;
  int64_t seq = 16;
  int threads = 0;  // 0: ONNX Runtime's default, one thread per physical core
  bool values = false;
};

bool parse(int argc, char** argv, Options& options) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--seq" || arg == "--threads") && i + 1 < argc) {
      const long value = std::strtol(argv[++i], nullptr, 10);
      if (value < (arg == "--seq" ? 1 : 0)) return false;
      if (arg == "--seq") options.seq = value; else options.threads = static_cast<int>(value);
    } else if (arg == "--values") {
      options.values = true;
    } else if (!arg.empty() && arg[0] != '-' && options.model.empty()) {
      options.model = arg;
    } else {
      return false;
    }
  }
  return !options.model.empty();
}

// The token at position t of input `name` (batch 1).
int64_t fill_value(const std::string& name, int64_t t) {
  if (name == "input_ids") return (7 * t + 3) % 100;
  if (name == "attention_mask") return 1;
  if (name == "position_ids") return t;
  return 0;  // token_type_ids and other integer inputs
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  if (!parse(argc, argv, options)) {
    std::fprintf(stderr, "usage: prefill MODEL.onnx [--seq N] [--threads N] [--values]\n");
    return 2;
  }
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "espace-prefill");
    Ort::SessionOptions session_options;
    session_options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    session_options.SetIntraOpNumThreads(options.threads);
    // A GPU build (onnxruntime-gpu) would add its provider here, before the session is made:
    //   OrtCUDAProviderOptions cuda{};
    //   session_options.AppendExecutionProvider_CUDA(cuda);
    Ort::Session session(env, options.model.c_str(), session_options);
    Ort::AllocatorWithDefaultOptions allocator;
    const Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

    // Inputs: names and types from the graph (compression never renames them).
    const size_t input_count = session.GetInputCount();
    std::vector<std::string> input_names;
    std::vector<std::vector<int64_t>> int64_buffers(input_count);
    std::vector<std::vector<int32_t>> int32_buffers(input_count);
    std::vector<Ort::Value> inputs;
    for (size_t i = 0; i < input_count; ++i) {
      input_names.push_back(session.GetInputNameAllocated(i, allocator).get());
      const Ort::TypeInfo type = session.GetInputTypeInfo(i);
      const auto tensor = type.GetTensorTypeAndShapeInfo();
      std::vector<int64_t> shape = tensor.GetShape();
      if (shape.size() == 2) {
        shape = {1, options.seq};
      } else if (!shape.empty()) {
        std::fprintf(stderr, "error: input %s has rank %zu; this example feeds [batch, seq] inputs\n",
                     input_names.back().c_str(), shape.size());
        return 2;
      }
      const int64_t count = shape.empty() ? 1 : options.seq;
      const ONNXTensorElementDataType element = tensor.GetElementType();
      if (element == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
        for (int64_t t = 0; t < count; ++t) int64_buffers[i].push_back(fill_value(input_names.back(), t));
        inputs.push_back(Ort::Value::CreateTensor<int64_t>(memory, int64_buffers[i].data(), int64_buffers[i].size(),
                                                           shape.data(), shape.size()));
      } else if (element == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) {
        for (int64_t t = 0; t < count; ++t)
          int32_buffers[i].push_back(static_cast<int32_t>(fill_value(input_names.back(), t)));
        inputs.push_back(Ort::Value::CreateTensor<int32_t>(memory, int32_buffers[i].data(), int32_buffers[i].size(),
                                                           shape.data(), shape.size()));
      } else {
        std::fprintf(stderr, "error: input %s is not an integer tensor; this example feeds token inputs\n",
                     input_names.back().c_str());
        return 2;
      }
    }

    std::vector<std::string> output_names;
    for (size_t i = 0; i < session.GetOutputCount(); ++i)
      output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());
    std::vector<const char*> input_ptrs, output_ptrs;
    for (const auto& name : input_names) input_ptrs.push_back(name.c_str());
    for (const auto& name : output_names) output_ptrs.push_back(name.c_str());

    std::vector<Ort::Value> outputs = session.Run(Ort::RunOptions{nullptr}, input_ptrs.data(), inputs.data(),
                                                  inputs.size(), output_ptrs.data(), output_ptrs.size());

    for (size_t o = 0; o < outputs.size(); ++o) {
      const auto info = outputs[o].GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) continue;  // float outputs only
      const std::vector<int64_t> shape = info.GetShape();
      const size_t count = info.GetElementCount();
      const float* data = outputs[o].GetTensorData<float>();
      std::printf("%s [", output_names[o].c_str());
      for (size_t d = 0; d < shape.size(); ++d) std::printf(d ? ", %lld" : "%lld", static_cast<long long>(shape[d]));
      std::printf("]");
      const size_t shown = options.values ? count : (count < 4 ? count : 4);
      std::printf(options.values ? "\n" : " first values");
      for (size_t k = 0; k < shown; ++k) std::printf(options.values ? "%.9g\n" : " %.6g", data[k]);
      if (!options.values) std::printf("\n");
    }
  } catch (const Ort::Exception& error) {
    std::fprintf(stderr, "error: ONNX Runtime: %s\n", error.what());
    return 1;
  }
  return 0;
}
