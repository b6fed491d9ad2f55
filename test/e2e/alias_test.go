package e2e

import (
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
)

type v1ConfigFile = v1.ConfigFile

func emptyIndex() v1.ImageIndex { return empty.Index }
