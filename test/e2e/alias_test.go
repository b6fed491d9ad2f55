package e2e

import v1 "github.com/google/go-containerregistry/pkg/v1"

type v1ConfigFile = v1.ConfigFile
