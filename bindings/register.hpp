// One registration function per area; module.cpp only calls them.
#pragma once

#include <pybind11/pybind11.h>

namespace livemig::py_bindings {

void register_errors(pybind11::module_& m);
void register_bitmap(pybind11::module_& m);
void register_dest(pybind11::module_& m);
void register_source(pybind11::module_& m);
void register_wire(pybind11::module_& m);
void register_guest(pybind11::module_& m);
void register_session(pybind11::module_& m);
void register_balloon(pybind11::module_& m);
void register_verify(pybind11::module_& m);
void register_bench(pybind11::module_& m);
void register_tls(pybind11::module_& m);     // after register_bench: also adds the TLS loops to m._bench
void register_attach(pybind11::module_& m);  // after register_dest and register_source (their classes)
void register_attach_client(pybind11::module_& m);

}  // namespace livemig::py_bindings
