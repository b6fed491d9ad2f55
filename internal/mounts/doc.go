// Package mounts serves host folders to guests (vm create --mount
// HOSTDIR:GUESTDIR[:ro]) through a stream of the agent channel.
//
// The guest side (MountGuest) is a FUSE file system (hanwen/go-fuse) whose
// every operation is an SFTP request (pkg/sftp's client) on one stream.
// The host side is a per-mount server process (Launcher, ServerMain) that
// the daemon starts with the caller's uid, gid and supplementary groups,
// never root's on another user's behalf, and with no_new_privs; it answers
// SFTP (pkg/sftp's request server) from a Root: the folder, its symlinks
// resolved and its access checked as the caller, with every guest path
// resolved beneath it (openat2 RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS), so
// "..", absolute paths and symlinks that point out are refused by the host
// kernel. Files the guest creates are therefore the caller's, and what the
// caller may not do on the host, the guest may not do through the mount.
//
// A second stream per folder, the read stream (reads.go), carries the
// reads of files the guest opens read-only, in a small protocol of its own
// answered by the same server process from the same Root: SFTP's replies
// cost a guest under TCG two byte-by-byte copies of every byte read.
//
// SFTP v3 has few status codes; the server puts the errno in the status
// message ("errno=17 ...") and the guest side gives the same errno back to
// the guest program (EEXIST, ENOTEMPTY, EROFS, EACCES), and EIO for
// everything once the host folder has been deleted.
package mounts
