package moat

/*
#include <string.h>
#include <moat.h>
*/
import "C"

import (
	"encoding/json"
	"errors"
	"unsafe"
)

// ResolveSecrets loads the configuration of a workspace (path as for
// LoadConfig, whose errors it returns) and resolves its `secrets:` on this
// host (`op read` for op://, `aws ssm get-parameter` for ssm://): each
// variable's value, by name; empty when there are none. The values are
// secrets: the document libmoat returned them in is cleared before it is
// freed. A lookup that fails is an *Error with StatusConfig naming the
// variable and the backend (its value never).
func ResolveSecrets(path string) (map[string]string, error) {
	var cs cstrings
	defer cs.free()
	var handle *C.moat_config
	err := call(func(e **C.moat_error) C.moat_status {
		return C.moat_config_load(cs.of(path), &handle, e)
	})
	if err != nil {
		return nil, err
	}
	defer C.moat_config_free(handle)
	var text *C.char
	err = call(func(e **C.moat_error) C.moat_status {
		return C.moat_config_resolve_secrets_json(handle, &text, e)
	})
	if err != nil {
		return nil, err
	}
	n := C.strlen(text)
	doc := C.GoBytes(unsafe.Pointer(text), C.int(n))
	C.memset(unsafe.Pointer(text), 0, n)
	C.moat_string_free(text)
	defer func() {
		for i := range doc {
			doc[i] = 0
		}
	}()
	secrets := map[string]string{}
	if err := json.Unmarshal(doc, &secrets); err != nil {
		// The error of encoding/json may quote the document: not shown.
		return nil, errors.New("moat: moat_config_resolve_secrets_json: the document is not a JSON object of strings")
	}
	return secrets, nil
}
