package netctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// NAT table layout. Everything banger adds to nftables lives in this one
// table, so removing it is a single table delete.
const (
	NATTable          = "banger"
	NATChainPost      = "postrouting" // nat hook: masquerade guest traffic leaving the subnet
	NATChainForward   = "forward"     // filter hook: accept traffic to and from the bridge
	ipForwardSysctl   = "/proc/sys/net/ipv4/ip_forward"
	natTableFamily    = nftables.TableFamilyIPv4
	ifNameSize        = unix.IFNAMSIZ
	ipv4SrcAddrOffset = 12
)

// EnsureNAT (re)writes banger's nftables table in one atomic transaction:
//
//	table ip banger {
//	  chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//	    ip saddr <subnet> oifname != <bridge> [oifname <uplink>] masquerade }
//	  chain forward { type filter hook forward priority filter; policy accept;
//	    iifname <bridge> accept
//	    oifname <bridge> ct state established,related accept }
//	}
//
// uplink "" masquerades on any interface other than the bridge. Calling it
// again replaces the table's contents; nothing outside the table changes.
// Forwarding also needs EnableIPForward.
func EnsureNAT(ctx context.Context, cfg Config, uplink string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.WithDefaults()
	if uplink != "" {
		if err := validIfName(uplink); err != nil {
			return fmt.Errorf("NAT uplink: %w", err)
		}
	}
	conn, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open nftables: %w", err)
	}
	defer conn.CloseLasting() //nolint:errcheck // no lasting connection is opened

	table := &nftables.Table{Name: NATTable, Family: natTableFamily}
	// add+delete+add in one batch: the table ends up fresh whether or not
	// it existed, and readers never see it half-written.
	conn.AddTable(table)
	conn.DelTable(table)
	conn.AddTable(table)

	accept := nftables.ChainPolicyAccept
	post := conn.AddChain(&nftables.Chain{
		Name: NATChainPost, Table: table, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept,
	})
	fwd := conn.AddChain(&nftables.Chain{
		Name: NATChainForward, Table: table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept,
	})

	subnet := cfg.Subnet.Masked()
	mask := make([]byte, 4)
	for i := range subnet.Bits() {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	masq := []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: ipv4SrcAddrOffset, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: subnet.Addr().AsSlice()},
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ifname(cfg.Bridge)},
	}
	if uplink != "" {
		masq = append(masq,
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(uplink)})
	}
	masq = append(masq, &expr.Counter{}, &expr.Masq{})
	conn.AddRule(&nftables.Rule{Table: table, Chain: post, Exprs: masq})

	conn.AddRule(&nftables.Rule{Table: table, Chain: fwd, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(cfg.Bridge)},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}})
	conn.AddRule(&nftables.Rule{Table: table, Chain: fwd, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(cfg.Bridge)},
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}})
	if err := conn.Flush(); err != nil {
		return fmt.Errorf("write nftables table %s: %w", NATTable, err)
	}
	return nil
}

// RemoveNAT deletes banger's nftables table and everything in it. A missing
// table counts as removed.
func RemoveNAT(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	conn, err := nftables.New()
	if err != nil {
		return fmt.Errorf("open nftables: %w", err)
	}
	defer conn.CloseLasting() //nolint:errcheck // no lasting connection is opened
	table, err := findTable(conn)
	if err != nil || table == nil {
		return err
	}
	conn.DelTable(table)
	if err := conn.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete nftables table %s: %w", NATTable, err)
	}
	return nil
}

// NATRule is one rule of banger's table, as read back from the kernel.
type NATRule struct {
	Chain string
	Exprs []expr.Any
}

// NATState is what banger's nftables table holds.
type NATState struct {
	Present bool
	Chains  []string // chain names
	Rules   []NATRule
}

// InspectNAT reads banger's nftables table back from the kernel, for
// `doctor`, the orphan scan and tests.
func InspectNAT(ctx context.Context) (NATState, error) {
	if err := ctx.Err(); err != nil {
		return NATState{}, err
	}
	conn, err := nftables.New()
	if err != nil {
		return NATState{}, fmt.Errorf("open nftables: %w", err)
	}
	defer conn.CloseLasting() //nolint:errcheck // no lasting connection is opened
	table, err := findTable(conn)
	if err != nil || table == nil {
		return NATState{}, err
	}
	st := NATState{Present: true}
	chains, err := conn.ListChainsOfTableFamily(natTableFamily)
	if err != nil {
		return NATState{}, fmt.Errorf("list nftables chains: %w", err)
	}
	for _, c := range chains {
		if c.Table.Name != NATTable {
			continue
		}
		st.Chains = append(st.Chains, c.Name)
		rules, err := conn.GetRules(table, c)
		if err != nil {
			return NATState{}, fmt.Errorf("list rules of chain %s: %w", c.Name, err)
		}
		for _, r := range rules {
			st.Rules = append(st.Rules, NATRule{Chain: c.Name, Exprs: r.Exprs})
		}
	}
	return st, nil
}

func findTable(conn *nftables.Conn) (*nftables.Table, error) {
	tables, err := conn.ListTablesOfFamily(natTableFamily)
	if err != nil {
		return nil, fmt.Errorf("list nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == NATTable {
			return t, nil
		}
	}
	return nil, nil
}

// IfName decodes an interface name as nftables stores it (NUL padded).
func IfName(b []byte) string { return string(bytes.TrimRight(b, "\x00")) }

func ifname(n string) []byte {
	b := make([]byte, ifNameSize)
	copy(b, n)
	return b
}

// EnableIPForward turns on IPv4 forwarding in the calling thread's network
// namespace (net.ipv4.ip_forward = 1).
func EnableIPForward() error {
	if err := os.WriteFile(ipForwardSysctl, []byte("1\n"), 0o644); err != nil { //nolint:gosec // a sysctl file, mode unused
		return fmt.Errorf("enable IPv4 forwarding: %w", err)
	}
	return nil
}

// IPForwardEnabled reports whether IPv4 forwarding is on in the calling
// thread's network namespace.
func IPForwardEnabled() (bool, error) {
	b, err := os.ReadFile(ipForwardSysctl)
	if err != nil {
		return false, fmt.Errorf("read IPv4 forwarding setting: %w", err)
	}
	return strings.TrimSpace(string(b)) == "1", nil
}
