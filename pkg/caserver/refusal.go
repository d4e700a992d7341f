package caserver

import (
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Reasons of a refusal: the reason label of warren_ca_requests_refused_total.
const (
	ReasonNoToken           = "no_token"
	ReasonReviewFailed      = "token_review_failed"
	ReasonTokenInvalid      = "token_invalid"
	ReasonTokenExpired      = "token_expired"
	ReasonWrongAudience     = "wrong_audience"
	ReasonNotServiceAccount = "not_service_account"
	ReasonNotPodBound       = "token_not_pod_bound"
	ReasonCallerPodUnknown  = "caller_pod_unknown"
	ReasonNodeUnknown       = "node_unknown"
	ReasonNotNodeAgent      = "impersonation_not_allowed"
	ReasonNoPodOnNode       = "no_pod_on_node"
	ReasonBadIdentity       = "bad_identity"
	ReasonBadCSR            = "bad_csr"
	ReasonRateLimited       = "rate_limited"
	ReasonSignFailed        = "sign_failed"
	ReasonNotReady          = "not_ready"
)

// Reasons lists every reason, so that each series of
// warren_ca_requests_refused_total exists from the start.
var Reasons = []string{ReasonNoToken, ReasonReviewFailed, ReasonTokenInvalid, ReasonTokenExpired, ReasonWrongAudience,
	ReasonNotServiceAccount, ReasonNotPodBound, ReasonCallerPodUnknown, ReasonNodeUnknown, ReasonNotNodeAgent,
	ReasonNoPodOnNode, ReasonBadIdentity, ReasonBadCSR, ReasonRateLimited, ReasonSignFailed, ReasonNotReady}

// Refusal is a request the CA will not serve: a gRPC code, a reason for the
// metric and a message for the caller.
type Refusal struct {
	// Code is the gRPC status code returned.
	Code codes.Code
	// Reason is one of the Reason constants.
	Reason string
	// Message says why and what to do.
	Message string
}

func refuse(code codes.Code, reason, format string, args ...any) *Refusal {
	return &Refusal{Code: code, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// Error returns the message with the reason.
func (r *Refusal) Error() string { return fmt.Sprintf("refused (%s): %s", r.Reason, r.Message) }

// GRPCStatus makes status.FromError and status.Code see the refusal's code.
func (r *Refusal) GRPCStatus() *status.Status { return status.New(r.Code, r.Error()) }
