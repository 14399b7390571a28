// C++ exceptions to livemig.errors. The translator runs with the GIL held (any gil_scoped_release
// has been unwound by then) and looks the classes up at raise time, so livemig.errors may import
// _core without a cycle.
#include <pybind11/pybind11.h>

#include "livemig/base/errors.hpp"
#include "register.hpp"

namespace py = pybind11;

namespace livemig::py_bindings {
namespace {

void raise(const char* name, const py::object& instance) {
  const py::object cls = py::module_::import("livemig.errors").attr(name);
  PyErr_SetObject(cls.ptr(), instance.ptr());
}

py::object errors_class(const char* name) { return py::module_::import("livemig.errors").attr(name); }

}  // namespace

void register_errors(py::module_& /*m*/) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const KernelError& e) {
      raise("KernelError", errors_class("KernelError")(e.err(), e.what(), py::arg("step") = e.step(),
                                                       py::arg("address") = e.address(),
                                                       py::arg("bytes_done") = e.bytes_done()));
    } catch (const UnsupportedError& e) {
      raise("UnsupportedError", errors_class("UnsupportedError")(e.what(), py::arg("feature") = e.feature()));
    } catch (const AuthenticationError& e) {
      raise("AuthenticationError", errors_class("AuthenticationError")(e.what()));
    } catch (const ProtocolError& e) {
      raise("ProtocolError", errors_class("ProtocolError")(e.what()));
    } catch (const ConnectionLost& e) {
      raise("ConnectionLost", errors_class("ConnectionLost")(e.what()));
    } catch (const Error& e) {
      raise("LivemigError", errors_class("LivemigError")(e.what()));
    }
  });
}

}  // namespace livemig::py_bindings
