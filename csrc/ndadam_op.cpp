// The op schema (defined once, here), the argument checks every implementation shares, and the
// Python module ndadam_fused._C whose import loads the registrations.
//
// Layout after pytorch/extension-cpp: this file defines the op with TORCH_LIBRARY; the CPU
// kernel (cpu/vector_step_cpu.cpp) and the CUDA kernel (cuda/vector_step_cuda.cu) register
// their implementations with TORCH_LIBRARY_IMPL; the fake (meta) implementation that
// torch.compile traces with is registered from Python (ndadam_fused/backends/native.py).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <exception>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cuda/ndadam_cuda_plan.h"
#include "ndadam_op.h"
#include "ndadam_row_math.h"

#ifndef NDADAM_WITH_CUDA
#define NDADAM_WITH_CUDA 0
#endif

namespace ndadam {

namespace {

constexpr const char* kOp = "ndadam_fused::vector_step_";

at::ScalarType state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::string describe(const at::Tensor& t) {
  return std::string(c10::toString(t.scalar_type())) + " tensor of shape " + c10::str(t.sizes()) + " on " +
         t.device().str();
}

bool cpu_found_inf(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.0f;
}

std::vector<float> increment_cpu_steps(at::TensorList state_steps) {
  std::vector<float> steps(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step = *step + 1.0f;
    steps[i] = *step;
  }
  return steps;
}

int64_t resolve_single_pass_limit(int64_t max_single_pass_row_length) {
  return max_single_pass_row_length < 0 ? kSinglePassMaxRowLength : max_single_pass_row_length;
}

void check_hyper_tensor(const char* op, const at::Tensor& hyper, const at::Device& device) {
  TORCH_CHECK(hyper.scalar_type() == at::kDouble && hyper.dim() == 1 && hyper.numel() == 4 && hyper.is_contiguous() &&
                  hyper.device() == device,
              op, ": hyper must be a contiguous float64 tensor of 4 elements (lr, beta1, beta2, eps) on ",
              device.str(), ", got a ", describe(hyper));
}

void check_scaler_tensors(const char* op, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, const at::Device& device) {
  for (const auto& [name, tensor] : {std::pair<const char*, const std::optional<at::Tensor>&>{"grad_scale", grad_scale},
                                     std::pair<const char*, const std::optional<at::Tensor>&>{"found_inf", found_inf}}) {
    if (tensor.has_value()) {
      TORCH_CHECK(tensor->numel() == 1 && tensor->scalar_type() == at::kFloat && tensor->device() == device, op, ": ",
                  name, " must be a one-element float32 tensor on ", device.str(),
                  " (GradScaler's, moved to the params' device), got a ", describe(*tensor));
    }
  }
}

void check_master_and_rounding(const char* op, at::TensorList params, at::TensorList master_params,
                               at::TensorList rounding_seeds) {
  const size_t n = params.size();
  TORCH_CHECK(master_params.empty() || rounding_seeds.empty(), op,
              ": master_params and rounding_seeds are two ways to keep small updates of bfloat16 params; pass one");
  TORCH_CHECK(master_params.empty() || master_params.size() == n, op, ": master_params needs one entry per param (or ",
              "none), but got ", master_params.size(), " for ", n, " params");
  TORCH_CHECK(rounding_seeds.empty() || rounding_seeds.size() == n, op, ": rounding_seeds needs one entry per param (or ",
              "none), but got ", rounding_seeds.size(), " for ", n, " params");
  for (size_t i = 0; i < master_params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& master = master_params[i];
    TORCH_CHECK(p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf, op, ": master_params[", i,
                "] is given for params[", i, "], a ", describe(p), "; master copies are for bfloat16 and float16 params");
    TORCH_CHECK(master.scalar_type() == at::kFloat && master.sizes() == p.sizes() && master.device() == p.device() &&
                    master.is_contiguous(),
                op, ": master_params[", i, "] is a ", describe(master), "; expected a contiguous float32 tensor of shape ",
                c10::str(p.sizes()), " on ", p.device().str());
    TORCH_CHECK(!master.is_same(p), op, ": master_params[", i, "] is params[", i, "] itself");
  }
  for (size_t i = 0; i < rounding_seeds.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& seed = rounding_seeds[i];
    TORCH_CHECK(p.scalar_type() == at::kBFloat16, op, ": rounding_seeds[", i, "] is given for params[", i, "], a ",
                describe(p), "; stochastic rounding rounds to bfloat16 only");
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == p.device(), op,
                ": rounding_seeds[", i, "] is a ", describe(seed), "; expected a one-element int64 tensor on ",
                p.device().str());
  }
}

void check_gradient(const char* op, at::TensorList grads, at::TensorList params, size_t index) {
  const at::Tensor& g = grads[index];
  const at::Tensor& p = params[index];
  TORCH_CHECK(g.layout() == at::kStrided && g.device() == p.device() && g.scalar_type() == p.scalar_type() &&
                  g.sizes() == p.sizes() && g.is_contiguous(),
              op, ": grads[", index, "] is a ", describe(g), (g.layout() == at::kStrided ? "" : " (sparse)"),
              " but params[", index, "] is a ", describe(p),
              "; the gradient must be dense, contiguous and match its param in shape, dtype and device");
}

HostHyperparameters read_and_check_hyperparameters(const char* op, const at::Tensor& hyper) {
  const double* values = hyper.const_data_ptr<double>();
  const HostHyperparameters h{values[0], values[1], values[2], values[3]};
  TORCH_CHECK(std::isfinite(h.lr) && h.lr >= 0.0, op, ": hyper[0] (lr) must be a finite number >= 0, got ", h.lr);
  TORCH_CHECK(h.beta1 >= 0.0 && h.beta1 < 1.0, op, ": hyper[1] (beta1) must be in [0, 1), got ", h.beta1);
  TORCH_CHECK(h.beta2 >= 0.0 && h.beta2 < 1.0, op, ": hyper[2] (beta2) must be in [0, 1), got ", h.beta2);
  TORCH_CHECK(std::isfinite(h.eps) && h.eps >= 0.0, op, ": hyper[3] (eps) must be a finite number >= 0, got ", h.eps);
  return h;
}

void check_vector_step_arguments(const VectorStepTensors& call, const at::Tensor& hyper,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf, int64_t max_single_pass_row_length,
                                 c10::DeviceType device_type) {
  const at::TensorList params = call.params, grads = call.grads, exp_avgs = call.exp_avgs,
                       exp_avg_sqs = call.exp_avg_sqs, state_steps = call.state_steps;
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n,
              kOp, ": every list needs one entry per param, but got ", n, " params, ", grads.size(), " grads, ",
              exp_avgs.size(), " exp_avgs, ", exp_avg_sqs.size(), " exp_avg_sqs and ", state_steps.size(),
              " state_steps");
  TORCH_CHECK(max_single_pass_row_length >= -1, kOp,
              ": max_single_pass_row_length must be -1 (the default cut-over) or >= 0, got ",
              max_single_pass_row_length);
  TORCH_CHECK(hyper.device().type() == device_type, kOp, ": hyper is a ", describe(hyper), " but this is the ",
              c10::DeviceTypeName(device_type), " kernel");
  check_hyper_tensor(kOp, hyper, hyper.device());
  check_scaler_tensors(kOp, grad_scale, found_inf, hyper.device());
  if (n == 0) {
    TORCH_CHECK(call.master_params.empty() && call.rounding_seeds.empty(), kOp,
                ": master_params and rounding_seeds need one entry per param, but there are no params");
    return;
  }

  const at::Tensor& first = params[0];
  TORCH_CHECK(first.device().type() == device_type, kOp, ": params[0] is a ", describe(first),
              " but this is the ", c10::DeviceTypeName(device_type), " kernel");
  const at::ScalarType dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
              ": params[0] is a ", describe(first), "; the kernels take float32, float64, bfloat16 or float16");
  const at::Device device = first.device();
  const at::ScalarType acc_dtype = state_dtype(dtype);
  check_hyper_tensor(kOp, hyper, device);
  check_scaler_tensors(kOp, grad_scale, found_inf, device);

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == device && p.scalar_type() == dtype, kOp, ": params[", i, "] is a ", describe(p),
                " but params[0] is a ", describe(first),
                "; call the op once per (device, dtype), as ndadam_fused.backends.native does");
    TORCH_CHECK(p.dim() >= 2, kOp, ": params[", i, "] is a ", describe(p),
                "; a vector tensor needs at least 2 dims (one row per hidden unit)");
    TORCH_CHECK(p.is_contiguous(), kOp, ": params[", i, "] (", describe(p), ") must be contiguous");

    check_gradient(kOp, grads, params, i);

    const at::Tensor& m = exp_avgs[i];
    TORCH_CHECK(m.device() == device && m.scalar_type() == acc_dtype && m.sizes() == p.sizes() && m.is_contiguous(),
                kOp, ": exp_avgs[", i, "] is a ", describe(m), "; expected a contiguous ", c10::toString(acc_dtype),
                " tensor of shape ", c10::str(p.sizes()), " on ", device.str());

    const at::Tensor& v = exp_avg_sqs[i];
    TORCH_CHECK(v.device() == device && v.scalar_type() == acc_dtype && v.dim() == 1 &&
                    v.size(0) == row_count(p) && v.is_contiguous(),
                kOp, ": exp_avg_sqs[", i, "] is a ", describe(v), "; expected a contiguous ", c10::toString(acc_dtype),
                " tensor of shape [", row_count(p), "] (one second moment per row) on ", device.str());

    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.device() == device && step.scalar_type() == at::kFloat && step.numel() == 1, kOp,
                ": state_steps[", i, "] is a ", describe(step), "; expected a one-element float32 tensor on ",
                device.str(), " (the param's device, as fused Adam keeps it)");
  }
  check_master_and_rounding(kOp, params, call.master_params, call.rounding_seeds);
}

}  // namespace ndadam

// One schema for every device. Params, exp_avgs, exp_avg_sqs, state_steps and master_params are
// updated in place (state_steps incremented by 1 before the math); the rest is only read.
// hyper = (lr, β1, β2, ε), float64 on the params' device: the CUDA kernel reads it there, so a
// changed lr (schedulers, CUDA graph replays) never needs a new kernel argument. grad_scale and
// found_inf are GradScaler's (gradients divided by grad_scale; found_inf nonzero: nothing
// changes, step counts included). master_params (fp32 copies of bf16/fp16 params: rows read from
// and written to them, params get w' rounded to nearest) and rounding_seeds (bf16 params: w'
// rounded stochastically, ndadam_rounding.h) are empty lists when unused.
TORCH_LIBRARY(ndadam_fused, m) {
  m.def(
      "vector_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] state_steps, Tensor hyper, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor(e!)[] master_params, Tensor[] rounding_seeds, int max_single_pass_row_length=-1) -> ()");
}

// ndadam_fused._C: importing it loads the registrations above. Its two constants say what the
// build holds, for ndadam_fused.backends.native.unavailable_reason. Its functions expose what
// tests need to see of the CUDA kernel's host side: the lane counts of its launch plan (the
// torch-free plan code, in every build) and, in a CUDA build, how many device tables it built.
namespace {

// cuda_plan_lanes(shapes, param_element_size, max_single_pass_row_length=-1) -> dict: the CUDA
// kernel's plan for one launch over tensors of `shapes` ((rows, row_length) pairs), their
// buffers aligned as the caching allocator aligns them: elements, thread slots (threads
// launched x elements each could hold), blocks, and elements on the statistics path.
PyObject* cuda_plan_lanes(PyObject* /*module*/, PyObject* args) {
  PyObject* shapes = nullptr;
  int param_size = 0;
  long long max_single_pass_row_length = -1;
  if (!PyArg_ParseTuple(args, "Oi|L", &shapes, &param_size, &max_single_pass_row_length)) {
    return nullptr;
  }
  if (param_size != 2 && param_size != 4 && param_size != 8) {
    PyErr_Format(PyExc_ValueError, "cuda_plan_lanes: param_element_size must be 2, 4 or 8, got %d", param_size);
    return nullptr;
  }
  if (max_single_pass_row_length < -1) {
    PyErr_Format(PyExc_ValueError, "cuda_plan_lanes: max_single_pass_row_length must be -1 or >= 0, got %lld",
                 max_single_pass_row_length);
    return nullptr;
  }
  const Py_ssize_t n = PySequence_Size(shapes);
  if (n < 0) {
    return nullptr;
  }
  std::vector<ndadam::cuda_plan::TensorArguments> tensors;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* shape = PySequence_GetItem(shapes, i);
    if (shape == nullptr) {
      return nullptr;
    }
    long long rows = -1, row_length = -1;
    if (PySequence_Size(shape) == 2) {
      PyObject* r = PySequence_GetItem(shape, 0);
      PyObject* l = PySequence_GetItem(shape, 1);
      rows = r != nullptr ? PyLong_AsLongLong(r) : -1;
      row_length = l != nullptr ? PyLong_AsLongLong(l) : -1;
      Py_XDECREF(r);
      Py_XDECREF(l);
    }
    Py_DECREF(shape);
    if (PyErr_Occurred() != nullptr || rows < 0 || row_length < 0) {
      PyErr_Clear();
      PyErr_Format(PyExc_ValueError, "cuda_plan_lanes: shapes[%zd] must be a (rows, row_length) pair of integers >= 0",
                   i);
      return nullptr;
    }
    // Each array of each tensor on its own 512-byte-aligned block, as the caching allocators give.
    auto at = [&](uintptr_t array) { return reinterpret_cast<void*>(((uintptr_t(i) + 1) << 36) + (array << 32)); };
    tensors.push_back({at(0), at(1), at(2), at(3), static_cast<float*>(at(4)), rows, row_length});
  }
  const int acc_size = param_size == 8 ? 8 : 4;
  const int64_t limit = ndadam::resolve_single_pass_limit(max_single_pass_row_length);
  try {
    const ndadam::cuda_plan::LaunchPlan plan = ndadam::cuda_plan::make_launch_plan(tensors, param_size, acc_size, limit);
    long long statistics_elements = 0;
    for (int32_t i = 0; i < plan.tensors(); ++i) {
      const auto& e = plan.entries()[i];
      if (e.path == ndadam::cuda_plan::kStatisticsRows) {
        statistics_elements += e.rows * e.row_length;
      }
    }
    return Py_BuildValue("{s:L,s:L,s:L,s:L}", "elements", static_cast<long long>(plan.lanes.elements), "slots",
                         static_cast<long long>(plan.lanes.slots), "blocks", static_cast<long long>(plan.blocks),
                         "statistics_elements", statistics_elements);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  }
}

#if NDADAM_WITH_CUDA
// cuda_table_builds() -> int: device tables the CUDA kernel has built in this process.
PyObject* cuda_table_builds(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(static_cast<long long>(ndadam::cuda_table_builds()));
}
#endif

PyMethodDef module_methods[] = {
    {"cuda_plan_lanes", cuda_plan_lanes, METH_VARARGS,
     "cuda_plan_lanes(shapes, param_element_size, max_single_pass_row_length=-1) -> dict of the CUDA kernel's "
     "launch plan: elements, slots, blocks, statistics_elements"},
#if NDADAM_WITH_CUDA
    {"cuda_table_builds", cuda_table_builds, METH_NOARGS,
     "cuda_table_builds() -> int: device tables the CUDA kernel has built in this process"},
#endif
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "ND-Adam kernels; the op is torch.ops.ndadam_fused.vector_step_",
      -1,
      module_methods,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "BUILT_WITH_CUDA", NDADAM_WITH_CUDA) < 0 ||
      PyModule_AddIntConstant(module, "SINGLE_PASS_MAX_ROW_LENGTH", ndadam::kSinglePassMaxRowLength) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
