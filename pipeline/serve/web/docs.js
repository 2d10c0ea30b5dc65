// Swagger UI over this server's OpenAPI document. A file of its own, not an inline script:
// the server's Content-Security-Policy allows scripts from itself only.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
