package kube

import (
	"context"
	"fmt"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// SecretReader returns a reader of the Secret namespace/name's data for
// builtinca.FromSecret (the agent needs get on that one Secret; the chart's
// Role grants exactly that). See the package documentation for who creates it.
func SecretReader(client kubernetes.Interface, namespace, name string) func(ctx context.Context) (map[string][]byte, error) {
	return func(ctx context.Context) (map[string][]byte, error) {
		s, err := client.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("get secret %s/%s: %w", namespace, name, err)
		}
		return s.Data, nil
	}
}
