/* The offsets `perfpy dump --locals` uses for CPython 3.11 and 3.12 (src/dump_locals.rs,
 * LOCALS_3_11), from the version's own headers; compiled and run by tests/it/dump.rs. */
#define Py_BUILD_CORE 1
#include <Python.h>
#include <stddef.h>
#include <stdio.h>
#include "internal/pycore_frame.h"
#include "internal/pycore_code.h"
int main(void) {
    printf("frame_localsplus %zu\n", offsetof(_PyInterpreterFrame, localsplus));
    printf("code_localsplusnames %zu\n", offsetof(PyCodeObject, co_localsplusnames));
    printf("code_localspluskinds %zu\n", offsetof(PyCodeObject, co_localspluskinds));
    return 0;
}
