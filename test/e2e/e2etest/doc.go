// Package e2etest is the harness of banger's end-to-end tests: the real
// banger daemon and CLI binaries (built once per test binary), run inside a
// network namespace each test creates, pulling real images from Debian's
// docker-registry and booting them under QEMU (or the fake Firecracker).
//
// Each capability has its own test package under test/e2e (lifecycle,
// restart, crash, catalog, firstboot, ...), so that every package finishes
// well inside go test's default 10-minute timeout. Each package's TestMain
// is
//
//	func TestMain(m *testing.M) { e2etest.Main(m) }
//
// Main ties every run to its test binary so that a binary killed by the
// timeout leaves nothing behind: see Main, Start and Sweep. docs/testing.md
// says how to add a package.
package e2etest
