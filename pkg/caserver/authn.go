package caserver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/grpc/codes"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Keys of TokenReview's status.user.extra for a token bound to a Pod.
const (
	ExtraPodName  = "authentication.kubernetes.io/pod-name"
	ExtraPodUID   = "authentication.kubernetes.io/pod-uid"
	ExtraNodeName = "authentication.kubernetes.io/node-name"
)

// DefaultAudience is the token audience accepted by default, Istio's.
const DefaultAudience = "istio-ca"

// saUserPrefix prefixes the user name of a ServiceAccount.
const saUserPrefix = "system:serviceaccount:"

// Caller is an authenticated client: the ServiceAccount of its token and the
// Pod the token is bound to.
type Caller struct {
	// Namespace and ServiceAccount name the token's ServiceAccount.
	Namespace, ServiceAccount string
	// PodName and PodUID name the Pod the token is bound to.
	PodName, PodUID string
	// NodeName is the bound pod's node as the token says it
	// (authentication.kubernetes.io/node-name); "" when the API server did
	// not embed it, and the Authorizer then reads the pod's spec.nodeName.
	NodeName string
}

// String names the caller in errors and logs.
func (c Caller) String() string {
	if c.Namespace == "" {
		return "unauthenticated"
	}
	s := c.Namespace + "/" + c.ServiceAccount
	if c.PodName != "" {
		s += " (pod " + c.Namespace + "/" + c.PodName + ")"
	}
	return s
}

// Authenticator checks bearer tokens with the TokenReview API.
type Authenticator struct {
	client    kubernetes.Interface
	audiences []string
}

// NewAuthenticator returns an Authenticator that accepts tokens for any of
// audiences (DefaultAudience when empty).
func NewAuthenticator(client kubernetes.Interface, audiences []string) *Authenticator {
	if len(audiences) == 0 {
		audiences = []string{DefaultAudience}
	}
	return &Authenticator{client: client, audiences: slices.Clone(audiences)}
}

// Authenticate reviews token. It fails closed: any error, an unauthenticated
// review, a review whose audiences do not include one of ours, a user that
// is not a ServiceAccount or a token not bound to a Pod is a *Refusal.
func (a *Authenticator) Authenticate(ctx context.Context, token string) (Caller, error) {
	if token == "" {
		return Caller{}, refuse(codes.Unauthenticated, ReasonNoToken,
			"no bearer token: send the node agent's projected ServiceAccount token (audience %s) as \"authorization: Bearer <token>\"", strings.Join(a.audiences, ", "))
	}
	tr, err := a.client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: a.audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return Caller{}, &Refusal{Code: codes.Unavailable, Reason: ReasonReviewFailed,
			Message: fmt.Sprintf("review token: %v (the CA service needs RBAC to create tokenreviews.authentication.k8s.io; retry)", err)}
	}
	st := tr.Status
	if !st.Authenticated {
		reason, hint := ReasonTokenInvalid, "send a current projected ServiceAccount token"
		switch e := strings.ToLower(st.Error); {
		case strings.Contains(e, "audience"):
			reason, hint = ReasonWrongAudience, "project the token with audience "+strings.Join(a.audiences, " or ")
		case strings.Contains(e, "expired"):
			reason, hint = ReasonTokenExpired, "the kubelet refreshes projected tokens; re-read the token file"
		}
		return Caller{}, refuse(codes.Unauthenticated, reason, "token refused by the API server: %s (%s)", orUnknown(st.Error), hint)
	}
	if !slices.ContainsFunc(st.Audiences, func(s string) bool { return slices.Contains(a.audiences, s) }) {
		return Caller{}, refuse(codes.Unauthenticated, ReasonWrongAudience,
			"token audiences %v do not include %s: project the token with that audience", st.Audiences, strings.Join(a.audiences, " or "))
	}
	ns, sa, ok := splitSAUser(st.User.Username)
	if !ok {
		return Caller{}, refuse(codes.Unauthenticated, ReasonNotServiceAccount,
			"token of %q is not a ServiceAccount token: use a projected ServiceAccount token", st.User.Username)
	}
	c := Caller{Namespace: ns, ServiceAccount: sa,
		PodName: extra(st.User.Extra, ExtraPodName), PodUID: extra(st.User.Extra, ExtraPodUID), NodeName: extra(st.User.Extra, ExtraNodeName)}
	if c.PodName == "" || c.PodUID == "" {
		return Caller{}, refuse(codes.Unauthenticated, ReasonNotPodBound,
			"token of %s/%s is not bound to a Pod: the CA takes the caller's node from its pod, so use a projected token (serviceAccountToken volume), not a Secret or a TokenRequest without boundObjectRef", ns, sa)
	}
	return c, nil
}

func orUnknown(s string) string {
	if s == "" {
		return "not authenticated"
	}
	return s
}

// extra returns the single value of key, or "" when it is missing or ambiguous.
func extra(m map[string]authnv1.ExtraValue, key string) string {
	if v := m[key]; len(v) == 1 {
		return v[0]
	}
	return ""
}

// splitSAUser splits "system:serviceaccount:<ns>:<name>".
func splitSAUser(user string) (ns, name string, ok bool) {
	rest, found := strings.CutPrefix(user, saUserPrefix)
	if !found {
		return "", "", false
	}
	ns, name, ok = strings.Cut(rest, ":")
	if !ok || ns == "" || name == "" || strings.Contains(name, ":") {
		return "", "", false
	}
	return ns, name, true
}

// errNoBearer is returned by bearerToken for a malformed header.
var errNoBearer = errors.New("authorization metadata is not \"Bearer <token>\"")
