package moat

/*
#include <moat.h>
*/
import "C"

import "encoding/json"

// Config is a validated configuration (agent.yaml or moat.yaml).
type Config struct {
	// Name is the agent's name, or "" when the configuration names none.
	Name string
	// Image is the resolved image: image:, else from dependencies, else
	// ubuntu:22.04.
	Image string
	// JSON is the whole resolved configuration, as `moat config --json`
	// prints it.
	JSON json.RawMessage
}

// LoadConfig loads and validates the configuration of a workspace: path is
// the workspace directory, or its agent.yaml or moat.yaml. An invalid
// configuration is an *Error with StatusConfig and one Problem for each
// mistake, each with its file, line and column.
func LoadConfig(path string) (*Config, error) {
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
	config := &Config{Image: C.GoString(C.moat_config_image(handle))}
	if name := C.moat_config_name(handle); name != nil {
		config.Name = C.GoString(name)
	}
	var text *C.char
	err = call(func(e **C.moat_error) C.moat_status {
		return C.moat_config_to_json(handle, &text, e)
	})
	if err != nil {
		return nil, err
	}
	config.JSON = json.RawMessage(takeString(text))
	return config, nil
}
