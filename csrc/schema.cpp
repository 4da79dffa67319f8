// The one schema registration of the `batchkl` library.
#include <ATen/core/enum_tag.h>
#include <torch/library.h>

TORCH_LIBRARY(batchkl, m) {
  // The drop-in op: F.kl_div's semantics plus reduction='row'.
  m.def("kl(Tensor input, Tensor target, str reduction=\"mean\", bool log_target=False) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // The forward launch of the fused autograd: the loss and, for every
  // reduction but 'none', the gradients w.r.t. input / target (already scaled
  // by the reduction, in the broadcast shape) where asked; an empty tensor
  // where not. Backward only multiplies them by grad_output, and by the
  // fourth result where that is a 0-d float32 tensor: float16 gradients of
  // a scalar reduction are those of the sum, and it holds 1 / divisor (see
  // grads_of_sum in kl.h); empty otherwise.
  m.def(
      "kl_fused(Tensor input, Tensor target, str reduction, bool log_target, bool grad_input, bool grad_target) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Backward helper: grad *= scale in place (scale is 0-d, or one value per
  // row of grad's last dim). Leaves grad untouched where scale is exactly 1,
  // without reading it back to the host, so the usual loss.backward() costs
  // no pass over the gradient.
  m.def("kl_scale_(Tensor(a!) grad, Tensor scale) -> ()");
  // Backward of reduction='none', where grad_output is a full tensor.
  m.def(
      "kl_none_backward(Tensor grad, Tensor input, Tensor target, bool log_target, bool grad_input, "
      "bool grad_target) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The distillation op: a divergence between softmax(target / T) (teacher P)
  // and softmax(input / T) (student Q), rows along the last dim. beta picks
  // it as in TRL's generalized_jsd_loss: 0 = KL(P || Q), 1 = KL(Q || P),
  // otherwise the generalized JSD. 'none' gives one value per row. probs=True
  // reads the rows as unnormalised probabilities instead of logits. dtype:
  // of the result (default: the inputs' promoted dtype); the kernel
  // accumulates in float32 or wider whatever it is.
  m.def(
      "kl_with_logits(Tensor input, Tensor target, float beta=0.0, float temperature=1.0, "
      "str reduction=\"batchmean\", Tensor? mask=None, Tensor? num_items_in_batch=None, bool probs=False, "
      "ScalarType? dtype=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Its forward launch: the loss and the gradients w.r.t. input / target
  // (already scaled by the reduction) where asked, an empty tensor where not,
  // and the factor of float16 gradients, as kl_fused.
  m.def(
      "kl_with_logits_fused(Tensor input, Tensor target, float beta, float temperature, str reduction, "
      "Tensor? mask, Tensor? num_items_in_batch, bool probs, bool grad_input, bool grad_target, "
      "ScalarType? dtype=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}
