// Package ztunnel is warren's L4 tunnel: the outbound (15001), inbound
// plaintext (15006) and inbound HBONE (15008) listeners that run inside each
// enrolled pod's network namespace, joining capture (pkg/loader), HBONE
// (pkg/hbone) and identity (pkg/identity).
package ztunnel
