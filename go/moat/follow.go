package moat

/*
#include <stddef.h>
#include <stdint.h>
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// moatGoOutput is Follow's log callback: it writes one chunk of a run's
// output to the output behind the cgo.Handle in user. Non-zero stops
// following.
//
//export moatGoOutput
func moatGoOutput(user unsafe.Pointer, stream *C.char, data *C.uint8_t, n C.size_t) C.int {
	out, ok := cgo.Handle(uintptr(user)).Value().(*output)
	if !ok {
		return 1
	}
	w := out.stderr
	if C.GoString(stream) == "stdout" {
		w = out.stdout
	}
	if w == nil || n == 0 {
		return 0
	}
	if _, err := w.Write(C.GoBytes(unsafe.Pointer(data), C.int(n))); err != nil {
		out.err = err
		return 1
	}
	return 0
}
