# The two entry points of the README. Everything they need is installed by hack/.
.PHONY: run test lint crds bench

run:  ## set up, then run a local relay from examples/quickstart/ on 127.0.0.1:2525
	@bash hack/setup.sh
	.venv/bin/mailrelay run -f examples/quickstart/

test:  ## set up everything (Debian packages, .venv, kube-apiserver/etcd/helm from Go modules), run every test
	@bash hack/test.sh

lint:
	.venv/bin/ruff check relay mailrelay_api operator tests bench hack
	.venv/bin/mypy

crds:  ## regenerate deploy/crds/ from mailrelay_api/schema.py, its copy in the Helm chart, docs/reference.md
	.venv/bin/python -m mailrelay_api.crdgen
	bash hack/sync-chart-crds.sh
	.venv/bin/python hack/gen-docs.py

bench:  ## every benchmark the README quotes, side by side with Postfix (root; results in bench/results/)
	@bash hack/setup.sh
	.venv/bin/python bench/relay_vs_postfix.py
	.venv/bin/python bench/policy_vs_postfix.py
	.venv/bin/python bench/milter_vs_postfix.py
	.venv/bin/python bench/sessions.py
	bash hack/install-tools.sh
	KUBEBUILDER_ASSETS=$(CURDIR)/.tools/bin .venv/bin/python bench/operator_scale.py
	KUBEBUILDER_ASSETS=$(CURDIR)/.tools/bin .venv/bin/python bench/operator_scale.py --domains 100000
